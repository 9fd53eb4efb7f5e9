"""Accuracy benchmarks: train, evaluate and report every row of benchmarks/accuracy.md.

    python benchmarks/accuracy.py train ROW [--hours H]   # trains (or resumes) ROW within H hours
    python benchmarks/accuracy.py evaluate ROW            # test metrics of ROW's best model
    python benchmarks/accuracy.py report                  # rewrites benchmarks/accuracy.md
    python benchmarks/accuracy.py list

Training runs live in $SCHNET_MD_RUNS (default ~/.cache/schnet-md/runs/accuracy/ROW) and resume where
they stopped; each evaluation is stored in benchmarks/accuracy/ROW.json with the hardware, versions,
training time and command, so the report is rebuilt from recorded runs only.

    python benchmarks/accuracy.py annotate ROW [--load TEXT] [--note TEXT] [--paused-minutes M]
    python benchmarks/accuracy.py refined NAME REFINE_DIR --command "schnet-md refine ..." [--load TEXT]

`refined` records a `schnet-md refine` run of a shipped model (its rounds.json: frames added, test errors before
and after each round, checks) in benchmarks/accuracy/refine_NAME.json; the report gives before and after.

records what the train command cannot know about its own session (the last one, or --session K): other jobs
sharing the machine (`load`), why it was stopped (`note`), and minutes it spent paused with SIGSTOP inside
epochs that stay in the history (`paused_minutes`, taken out of the row's hours).

Protocols
- md17_*  (original MD17 labels, as in the SchNet paper's "N = 1,000" table) and rmd17_* (revised
  labels): train on all 1,000 frames of rmd17_<mol>_train_01.npz; validate on 500 frames of
  rmd17_<mol>_train_02.npz that appear in neither train_01 nor test_01 (checked by old_indices);
  test on the 1,000 frames of rmd17_<mol>_test_01.npz.
- iso17x: train on `train`, validate on `validation`, test on `test_within` (known molecules) and
  `test_other` (unknown molecules). GFN2-xTB labels: not the paper's DFT ISO17 benchmark.
- qm9_N: N training molecules drawn at random (seed 0) from QM9 U0, 1,000 for validation, a fixed
  10,000 for test; energies only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import schnet_md
from schnet_md.bench import cpu_name
from schnet_md.data import read_iso17x, read_qm9, read_rmd17
from schnet_md.evaluate import evaluate
from schnet_md.model import config_from_preset
from schnet_md.modelfile import load_model
from schnet_md.train import TrainSettings, read_checkpoint, train

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SCHNET_MD_DATA", ROOT.parent / "shared" / "data"))
RUNS = Path(os.environ.get("SCHNET_MD_RUNS", Path.home() / ".cache" / "schnet-md" / "runs" / "accuracy"))
RESULTS = ROOT / "benchmarks" / "accuracy"

# Published numbers for comparison: SchNet (Schütt et al. 2017, MD17 N=1,000, kcal/mol and kcal/mol/Å)
# and MACE (Batatia et al. 2022, rMD17 N=1,000, meV and meV/Å).
PAPER = {"ethanol": (0.08, 0.39), "malonaldehyde": (0.13, 0.66), "aspirin": (0.37, 1.35)}
MACE = {"ethanol": (0.4, 2.1), "malonaldehyde": (0.8, 4.1), "aspirin": (2.2, 6.6)}
ISO17_PAPER = {"test_within": (0.36, 1.00), "test_other": (2.40, 2.18)}
QM9_SIZES = (1000, 10000, 50000, 110000)

MD17_SETTINGS = dict(batch_size=16, learning_rate=1e-3, rho=0.01, lr_patience=25, lr_factor=0.5,
                     min_learning_rate=1e-5, ema_decay=0.99, epochs=5000)


def rows() -> dict:
    out = {}
    for mol in PAPER:
        out[f"md17_{mol}"] = dict(kind="md17", molecule=mol, labels="old", settings=MD17_SETTINGS)
        out[f"rmd17_{mol}"] = dict(kind="md17", molecule=mol, labels="new", settings=MD17_SETTINGS)
    out["iso17x"] = dict(kind="iso17x", settings=dict(batch_size=32, learning_rate=1e-3, rho=0.01, lr_patience=3,
                                                      ema_decay=0.999, epochs=200))
    for n in QM9_SIZES:
        out[f"qm9_{n // 1000}k"] = dict(kind="qm9", n_train=n, settings=dict(
            batch_size=32, learning_rate=1e-3, lr_patience=10, ema_decay=0.999, epochs=2000))
    return out


def load_row(row: dict):
    """(train, validation, {test name: data}, preset) for a row."""
    if row["kind"] == "md17":
        folder = DATA / "rmd17"
        mol, labels = row["molecule"], row["labels"]
        train_file = folder / f"rmd17_{mol}_train_01.npz"
        test_file = folder / f"rmd17_{mol}_test_01.npz"
        used = set(np.load(train_file)["old_indices"]) | set(np.load(test_file)["old_indices"])
        pool_file = folder / f"rmd17_{mol}_train_02.npz"
        free = [k for k, i in enumerate(np.load(pool_file)["old_indices"]) if i not in used][:500]
        return (read_rmd17(train_file, labels), read_rmd17(pool_file, labels).subset(free),
                {"test": read_rmd17(test_file, labels)}, "schnet2017")
    if row["kind"] == "iso17x":
        folder = DATA / "iso17x"
        return (read_iso17x(folder, "train"), read_iso17x(folder, "validation"),
                {"test_within": read_iso17x(folder, "test_within"), "test_other": read_iso17x(folder, "test_other")},
                "schnet2017")
    if row["kind"] == "qm9":
        path = DATA / "qm9" / "qm9_u0.npz"
        order = np.random.default_rng(0).permutation(130831)
        test, val, pool = order[:10000], order[10000:11000], order[11000:]
        q = read_qm9(path)
        return (q.subset(pool[:row["n_train"]]).converted("eV"), q.subset(val).converted("eV"),
                {"test": q.subset(test).converted("eV")}, "schnet2017")
    raise ValueError(row["kind"])



def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} CPU, {torch.get_num_threads()} thread(s)"


def cmd_train(name: str, hours: float) -> None:
    row = rows()[name]
    data, validation, _, preset = load_row(row)
    out = RUNS / name
    config = config_from_preset(preset, sorted(set(data.elements) | set(validation.elements)),
                                energy_unit=data.energy_unit)
    settings = TrainSettings(**{**row["settings"], "max_hours": hours})
    resume = (out / "checkpoint.pt").is_file()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sessions.json"   # recorded first, so a session that is stopped early is still on record
    sessions = json.loads(log.read_text()) if log.exists() else []
    sessions.append({"date": str(datetime.date.today()), "hours_budget": hours, "hardware": hardware(),
                     "command": "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])})
    log.write_text(json.dumps(sessions, indent=1))
    train(data, config, out, settings, resume=resume, validation=validation)


def cmd_evaluate(name: str) -> None:
    row = rows()[name]
    _, _, tests, _ = load_row(row)
    out = RUNS / name
    model, meta = load_model(out / "model.pt")
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text())
    else:   # a run stopped between epochs: its history is in the last epoch's checkpoint
        state = read_checkpoint(out / "checkpoint.pt")
        metrics = {"history": json.loads(state["history"]), "stop_reason": "stopped by hand (resumable)",
                   "settings": meta["training"]["settings"]}
    history = metrics["history"]
    t0 = time.perf_counter()
    result = {
        "row": name, "n_train": meta["training"]["n_train"], "n_validation": meta["training"]["n_validation"],
        "train_data": meta["training"]["data"], "validation_data": meta["training"].get("validation_data"),
        "epochs_run": len(history), "best_epoch": meta["training"]["epoch"],
        "training_hours": sum(h["seconds"] for h in history) / 3600,
        "stop_reason": metrics.get("stop_reason"), "settings": metrics["settings"],
        "sessions": json.loads((out / "sessions.json").read_text()) if (out / "sessions.json").exists() else [],
        "tests": {k: evaluate(model, d) for k, d in tests.items()},
        "evaluated": str(datetime.date.today()), "versions": {"schnet_md": schnet_md.__version__,
                                                              "torch": torch.__version__},
    }
    result["at_stop"] = state_at_stop(history)
    result["evaluation_seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result["tests"].items()}, indent=1))


def state_at_stop(history: list) -> dict:
    """Where training stood when it stopped: learning rate, and how much the validation energy MAE fell
    over the last tenth of the epochs (a converged run shows ~0 there and a decayed learning rate)."""
    last, earlier = history[-1], history[max(0, int(0.9 * len(history)) - 1)]
    return {"learning_rate": last["learning_rate"], "validation_energy_mae": last["validation_energy_mae"],
            "validation_energy_mae_change_last_tenth":
                last["validation_energy_mae"] / earlier["validation_energy_mae"] - 1,
            "epochs_in_last_tenth": last["epoch"] - earlier["epoch"]}


def _at_stop(result: dict) -> str:
    s = result.get("at_stop")
    if s is None:
        return "–"
    return (f"lr {s['learning_rate']:.0e}; val. energy MAE {100 * s['validation_energy_mae_change_last_tenth']:+.0f}% "
            f"over the last {s['epochs_in_last_tenth']} epochs")


def _fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def _hours(result: dict) -> str:
    """Wall hours of the training epochs, less the minutes recorded as paused inside them."""
    paused = sum(s.get("paused_minutes", 0) for s in result["sessions"])
    hours = result["training_hours"] - paused / 60
    return f"{hours:.2f}" + (f" (excl. {paused:.0f} min paused)" if paused else "")


def _hardware(session: dict) -> str:
    return session["hardware"] + (f" ({session['load']})" if session.get("load") else "")


def cmd_refined(name: str, folder: str, command: str, load: str | None) -> None:
    record = json.loads((Path(folder) / "rounds.json").read_text())
    record.update(name=name, command=command, hardware=f"{cpu_name()} CPU" + (f" ({load})" if load else ""),
                  recorded=str(datetime.date.today()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"refine_{name}.json").write_text(json.dumps(record, indent=1))
    print(f"{RESULTS / f'refine_{name}.json'}: {len(record['rounds'])} round(s)")


def _round_tests(entry: dict) -> dict:
    """{test set: (before, after)} of one round, from either record layout."""
    if "test" in entry:
        return {k: (v["before"], v["after"]) for k, v in entry["test"].items()}
    if "test_before" in entry:
        return {entry["test_before"]["data"]: (entry["test_before"], entry["test_after"])}
    return {}


def refine_section() -> list:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("refine_*.json"))]
    lines = ["", "## Shipped models after `schnet-md refine` (issue #15; kcal/mol, kcal/mol/Å)", "",
             "Each round: the checks, committee MD, new reference labels where the committee disagrees and where "
             "the checks failed, fine-tuning (best epoch on the model's own validation set). Test sets are the "
             "model's original splits; \"before\" is the model as shipped before refinement.", "",
             "| model | test set | energy MAE before | after | forces MAE before | after | rounds | frames added | "
             "checks after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if not r["rounds"]:
            continue
        first, last = _round_tests(r["rounds"][0]), _round_tests(r["rounds"][-1])
        final = r.get("final_check", {})
        checks = "all pass" if final.get("passed") else "fail: " + ", ".join(sorted({
            k for v in final.values() if isinstance(v, dict) for k, ok in v.items()
            if k != "passed" and (ok is False or (isinstance(ok, list) and not all(ok)))}))
        for test_set, (before, _) in first.items():
            after = last[test_set][1]
            lines.append(f"| {r['name']} | {test_set} | {_fmt(before['energy_mae_kcal_mol'], 3)} | "
                         f"{_fmt(after['energy_mae_kcal_mol'], 3)} | {_fmt(before['forces_mae_kcal_mol'], 3)} | "
                         f"{_fmt(after['forces_mae_kcal_mol'], 3)} | {len(r['rounds'])} | "
                         f"{sum(e['frames_added'] for e in r['rounds'])} | {checks} |")
    for r in records:
        lines += ["", f"`{r['name']}`: {r['recorded']}, {r['hardware']}, {r['settings']['method']} labels: "
                      f"`{r['command']}`", "",
                  "| round | checks failed before | frames (failed checks + MD) | max σ_F in MD (kJ/mol/nm) | "
                  "new labels: forces MAE before → after | test forces MAE before → after |", "|---|---|---|---|---|---|"]
        for e in r["rounds"]:
            failed = sorted({k for v in e["check_before"].values() for k, ok in
                             (v.items() if isinstance(v, dict) else [])
                             if k != "passed" and (ok is False or (isinstance(ok, list) and not all(ok)))}) \
                if all(isinstance(v, dict) for v in e["check_before"].values()) else \
                sorted(k for k, ok in e["check_before"].items() if ok is False or (isinstance(ok, list) and not all(ok)))
            new = (f"{e['labelled_before']['forces_mae_kcal_mol']:.2f} → {e['labelled_after']['forces_mae_kcal_mol']:.2f}"
                   if "labelled_before" in e else "–")
            tests = "; ".join(f"{b['forces_mae_kcal_mol']:.3f} → {a['forces_mae_kcal_mol']:.3f}"
                              for b, a in _round_tests(e).values()) or "–"
            sigma = e.get("max_md_disagreement_kj_mol_nm")
            lines.append(f"| {e['round']} | {', '.join(failed) or 'none'} | {e['frames_added']} "
                         f"({e['frames_from_failed_checks']} + {e['frames_from_md']}) | "
                         f"{'–' if sigma is None else f'{sigma:.0f}'} | {new} | {tests} |")
    return lines if records else []


def iso17x_refine_section() -> list:
    """The shipped iso17x's refinement stages (benchmarks/refine_iso17x.json, written with
    benchmarks/refine_iso17x.py and benchmarks/iso17x_tests.py): test errors of every stage."""
    path = ROOT / "benchmarks" / "refine_iso17x.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    tests = record["test_errors_kcal_mol"]
    results, labels = tests["results"], tests["labels"]
    models = [m for m in labels if m in results]
    names = [labels[m] + (" (shipped)" if m == tests["shipped_now"] else "") for m in models]
    lines = ["", "### iso17x: refinement stages (kcal/mol, kcal/mol/Å)", "",
             f"{record['recorded']}, {record['hardware']}; commands, frames and per-epoch validation in "
             "`benchmarks/refine_iso17x.json`, the story and the 500 K MD in `benchmarks/refine_iso17x.md`. "
             "The refinement saw frames of unknown isomers 7, 105 and 8, so test_other is also given without them.",
             "", "| test set | frames | " + " | ".join(f"energy MAE, {n}" for n in names) + " | "
             + " | ".join(f"forces MAE, {n}" for n in names) + " |", "|---|---|" + "---|" * (2 * len(models))]
    for key in results[models[0]]:
        rows = [results[m][key] for m in models]
        lines.append(f"| {key} | {rows[0]['n_frames']} | "
                     + " | ".join(_fmt(r["energy_mae_kcal_mol"], 3) for r in rows) + " | "
                     + " | ".join(_fmt(r["forces_mae_kcal_mol"], 3) for r in rows) + " |")
    return lines


def cmd_annotate(name: str, index: int, load: str | None, note: str | None, paused_minutes: float | None) -> None:
    """Amend one session record of ROW in its run folder, and the same session in its recorded evaluation
    if that has it (an evaluation made before the session does not)."""
    log = RUNS / name / "sessions.json"
    sessions = json.loads(log.read_text())
    session = sessions[index]
    key = {k: session[k] for k in ("date", "hours_budget", "command")}
    for field, value in (("load", load), ("note", note), ("paused_minutes", paused_minutes)):
        if value is not None:
            session[field] = value
    log.write_text(json.dumps(sessions, indent=1))
    print(f"{log}: {json.dumps(session)}")
    recorded = RESULTS / f"{name}.json"
    if recorded.exists():
        result = json.loads(recorded.read_text())
        matches = [k for k, s in enumerate(result["sessions"]) if {f: s.get(f) for f in key} == key]
        if matches:
            result["sessions"][matches[-1]] = session
            recorded.write_text(json.dumps(result, indent=1))
            print(f"{recorded}: updated too")


def cmd_report() -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")) if not p.stem.startswith("refine_")}
    lines = ["# Accuracy", "",
             "Regenerated by `python benchmarks/accuracy.py report` from the recorded runs in "
             "`benchmarks/accuracy/*.json`; each run: `python benchmarks/accuracy.py train ROW --hours H` "
             "(resumable) then `... evaluate ROW`. Protocols are in the script's docstring. Forces are "
             "component-wise. \"Epochs / hours\" is how far training got: rows trained on this project's "
             "2-core CPU are far from converged, and say so. Hours are the wall time of the epochs; where a "
             "training was paused (SIGSTOP, to keep the machine idle for speed benchmarks) inside an epoch, the "
             "pause is taken out and the row says so. The hardware column names the last session's machine and "
             "what else ran on it; the Runs list gives every session. \"At stop\" gives the learning rate when "
             "training stopped and how much the validation energy MAE fell over the last tenth of the epochs: "
             "a converged run has a decayed learning rate and ~0% there.", ""]

    def md17_table(prefix, unit, reference, ref_name):
        out = [f"| molecule | N train | epochs / hours | at stop | hardware | energy MAE | forces MAE | "
               f"{ref_name} energy | {ref_name} forces |", "|---|---|---|---|---|---|---|---|---|"]
        for mol, (e_ref, f_ref) in reference.items():
            r = results.get(f"{prefix}_{mol}")
            if r is None:
                out.append(f"| {mol} | – | not run yet | – | – | – | – | {e_ref} | {f_ref} |")
                continue
            t = r["tests"]["test"]
            hw = _hardware(r["sessions"][-1]) if r["sessions"] else "?"
            out.append(f"| {mol} | {r['n_train']} | {r['epochs_run']} / {_hours(r)} | {_at_stop(r)} | {hw} | "
                       f"{_fmt(t[f'energy_mae_{unit}'])} | {_fmt(t[f'forces_mae_{unit}'])} | {e_ref} | {f_ref} |")
        return out

    lines += ["## MD17, original labels, N = 1,000 (kcal/mol, kcal/mol/Å)", ""]
    lines += md17_table("md17", "kcal_mol", PAPER, "SchNet paper")
    lines += ["", "## rMD17, revised labels, N = 1,000 (meV, meV/Å)", ""]
    lines += md17_table("rmd17", "meV", MACE, "MACE")
    lines += ["", "## ISO17-style (iso17x, GFN2-xTB labels; kcal/mol, kcal/mol/Å)", "",
              "Not the paper's benchmark: the paper's ISO17 used DFT (PBE+vdW-TS) labels and other frames; its "
              "numbers are given for scale only.", "",
              "| test set | N train | epochs / hours | at stop | energy MAE | forces MAE | paper (DFT ISO17) energy | "
              "forces |", "|---|---|---|---|---|---|---|---|"]
    r = results.get("iso17x")
    for split, (e_ref, f_ref) in ISO17_PAPER.items():
        if r is None:
            lines.append(f"| {split} | – | not run yet | – | – | – | {e_ref} | {f_ref} |")
        else:
            t = r["tests"][split]
            lines.append(f"| {split} | {r['n_train']} | {r['epochs_run']} / {_hours(r)} | {_at_stop(r)} | "
                         f"{_fmt(t['energy_mae_kcal_mol'])} | {_fmt(t['forces_mae_kcal_mol'])} | {e_ref} | {f_ref} |")
    lines += ["", "## QM9 U0, energies only (kcal/mol); paper: 0.31 at N = 110k", "",
              "| N train | epochs / hours | at stop | energy MAE |", "|---|---|---|---|"]
    for n in QM9_SIZES:
        r = results.get(f"qm9_{n // 1000}k")
        lines.append(f"| {n} | not run yet | – | – |" if r is None else
                     f"| {r['n_train']} | {r['epochs_run']} / {_hours(r)} | {_at_stop(r)} | "
                     f"{_fmt(r['tests']['test']['energy_mae_kcal_mol'])} |")
    lines += refine_section()
    lines += iso17x_refine_section()
    lines += ["", "## Runs", ""]
    for name, r in results.items():
        for s in r["sessions"]:
            extra = "".join(f"; {x}" for x in (s.get("note"), s.get("paused_minutes") and
                                                f"paused {s['paused_minutes']:.0f} min inside an epoch") if x)
            lines.append(f"- `{name}`: {s['date']}, {_hardware(s)}, budget {s['hours_budget']} h: "
                         f"`{s['command']}`{extra}")
    (ROOT / "benchmarks" / "accuracy.md").write_text("\n".join(lines) + "\n")
    print((ROOT / "benchmarks" / "accuracy.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("row", choices=list(rows()))
    t.add_argument("--hours", type=float, default=1.0)
    t.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("evaluate")
    e.add_argument("row", choices=list(rows()))
    e.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("annotate")
    a.add_argument("row", choices=list(rows()))
    a.add_argument("--session", type=int, default=-1, help="index into the row's sessions (default: the last)")
    a.add_argument("--load", help="what else ran on the machine during the session")
    a.add_argument("--note", help="e.g. why the session was stopped")
    a.add_argument("--paused-minutes", type=float, help="minutes paused (SIGSTOP) inside kept epochs")
    rf = sub.add_parser("refined")
    rf.add_argument("name")
    rf.add_argument("folder")
    rf.add_argument("--command", dest="command_text", required=True, help="the refine command, quoted")
    rf.add_argument("--load", help="what else ran on the machine")
    sub.add_parser("report")
    sub.add_parser("list")
    args = p.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "train":
        cmd_train(args.row, args.hours)
    elif args.command == "evaluate":
        cmd_evaluate(args.row)
    elif args.command == "annotate":
        cmd_annotate(args.row, args.session, args.load, args.note, args.paused_minutes)
    elif args.command == "refined":
        cmd_refined(args.name, args.folder, args.command_text, args.load)
    elif args.command == "report":
        cmd_report()
    else:
        for name, row in rows().items():
            print(name, row)


if __name__ == "__main__":
    main()
