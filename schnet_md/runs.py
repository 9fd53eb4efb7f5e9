"""Run folders: one writer at a time, writes that are whole or absent, and records of what a run read.

Every command that writes results (train, simulate, refine, label, sample, check, analyze, compare,
evaluate) goes through this module, so a folder belongs to one run:

- `exclusive(path, command)` holds an OS lock (flock) on the folder for the command's whole life. The
  kernel drops it when the process ends, however it ends (kill -9 included), so a lock is never stale. A
  second writer is refused with one line naming the holder's PID, host and command.
- `atomic_write` writes through a temporary file of this process's own and renames it into place: a
  reader, or a resume after a kill at any instant, sees the old file or the new one, never half of one.
  A full disk is named and leaves no temporary file behind.
- `input_record` / `changed_inputs`: a run records each input file by absolute path, size and SHA-256 when
  it starts; a resume compares them and names a file that changed (`require_settings`: a setting).
- `claim` refuses a folder that holds files the command would write but no record of a run of it (the
  user's own files), and with `overwrite` retires the old run's files before the new run starts.
- `RunInterrupted`: a command that stopped on SIGTERM or SIGINT after writing what a resume needs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

LOCK_NAME = ".schnet-md.lock"


class RunFolderError(ValueError):
    """A folder or file that this command must not write now: in use, someone else's, or changed inputs."""


class RunFolderBusy(RunFolderError):
    """Another process holds the folder's lock."""


class RunInterrupted(Exception):
    """A command stopped by SIGTERM (a batch system's preemption or time limit) or SIGINT (Ctrl-C) once it had
    written what a resume needs. `exit_code` is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT): the
    status a shell reports for a process ended by that signal, so scripts and batch systems see an unfinished run."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# ---- one writer per folder ----------------------------------------------------------------------------

_held: dict = {}    # lock file -> [fd, depth]: a process that already holds a folder may enter it again


def lock_path(path: str | os.PathLike, file: Optional[bool] = None) -> Path:
    """The lock file of a folder (inside it) or of a single output file (a hidden twin beside it). `file` says
    which `path` is; left out, a path that is a folder or has no suffix counts as a folder. A command should say:
    a folder named `out.v2` that does not exist yet would otherwise get the file's lock, and once it exists the
    folder's, so two runs could each hold a lock of their own."""
    path = Path(path)
    if file is False or (file is None and (path.is_dir() or not path.suffix)):
        return path / LOCK_NAME
    path = path.resolve()          # a symbolic link and its target are one output: one lock
    return path.with_name(f".{path.name}.lock")


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"PID {info.get('pid')} on {info.get('host')} ({info.get('command')}, since {since})"


@contextmanager
def exclusive(path: str | os.PathLike, command: str, file: Optional[bool] = None):
    """Hold `path` (a folder, or an output file: `file` as in lock_path) for the life of the block; refuse if
    another process does.

    On a network file system the lock is only as good as the server's: NFS v4 and Lustre with flock
    support honour it across machines; mounts without lock support (`nolock`, some FUSE file systems)
    make flock a local lock, and two jobs on different nodes are then not kept apart."""
    target = lock_path(path, file)
    made = [] if target.parent.exists() else [target.parent]     # a folder this command creates for its output
    target.parent.mkdir(parents=True, exist_ok=True)
    key = str(target.resolve())
    if key in _held:                 # re-entered by the same process (refine training its rounds, say)
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        where = target.parent if target.name == LOCK_NAME else target.with_name(target.name[1:-len(".lock")])
        raise RunFolderBusy(f"{where} is in use by {holder}: one writer at a time. Wait for it to finish, or "
                            "choose another output; a --resume can follow once it has stopped") from None
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                             "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        _held[key] = [fd, 1]
        yield
    finally:
        _held.pop(key, None)
        # The lock file stays (removing it could let a process that opened it lock a dead inode), except in a
        # folder this command created and left empty (a refused run leaves nothing behind).
        if made and sorted(p.name for p in made[0].iterdir()) == [LOCK_NAME]:
            target.unlink(missing_ok=True)
            made[0].rmdir()
        os.close(fd)


# ---- stopping on request ------------------------------------------------------------------------------

class StopRequests:
    """SIGTERM (what SLURM sends on preemption or at the time limit) and SIGINT (Ctrl-C) within the block are
    noted in `signum` and acted on by the run at its next safe point (a batch, a chunk of MD steps): a checkpoint,
    then RunInterrupted. A second signal of the same kind acts at once, as it would without this (files stay
    whole: every write is atomic). Outside the main thread (where Python runs no handlers) nothing is noted."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum, _frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum] or signal.SIG_DFL)

    def __exit__(self, *_exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler or signal.SIG_DFL)


# ---- writes that are whole or absent ------------------------------------------------------------------

CRASH_BEFORE_WRITE = "SCHNET_MD_CRASH_BEFORE_WRITE"
CRASH_EXIT = 86
_writes: dict = {}      # file name -> writes of it so far by this process


def _crash_point(path: Path) -> None:
    """For crash-consistency tests: SCHNET_MD_CRASH_BEFORE_WRITE=NAME:N ends the process at once, as a kill -9
    would (exit status 86), just before its N-th write of a file named NAME."""
    name, _, count = os.environ.get(CRASH_BEFORE_WRITE, "").rpartition(":")
    if name and path.name == name:
        _writes[name] = _writes.get(name, 0) + 1
        if _writes[name] == int(count):
            os._exit(CRASH_EXIT)


def atomic_write(path: str | os.PathLike, content: bytes | str | None = None,
                 writer: Optional[Callable] = None) -> Path:
    """Write `content` (or call `writer(binary_file)`) to a temporary file of this process beside `path`,
    flush it to disk and rename it over `path`. On failure nothing is replaced and the temporary is gone."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()      # write the file the link names; the link stays a link
    _crash_point(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if writer is not None:
                writer(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch's writers report a full disk as a RuntimeError of their own ("unexpected pos ..."): ask the disk
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                (isinstance(err, (OSError, RuntimeError)) and disk_full(path.parent)):
            raise RunFolderError(f"no space left on the device holding {path}: it was not written, and what was "
                                 "there before is unchanged; free space and run the command again (a run resumes "
                                 "from its last checkpoint)") from None
        raise
    return path


def disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Less than `margin` bytes free for this user on the file system holding `folder`."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < margin


def write_json(path: str | os.PathLike, value) -> Path:
    return atomic_write(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "record") -> dict:
    """A JSON record written by this package, with one clear line if it is damaged."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path} (the {what}) is damaged and cannot be read ({err}); restore it, or start "
                             "a new run with --overwrite") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} (the {what}) is damaged: it holds {type(value).__name__}, not a record")
    return value


# ---- files that carry their own checksum ----------------------------------------------------------------

SEAL = b"schnet-md sealed 1\n"


class SealError(RunFolderError):
    """A sealed file whose bytes no longer match its header: damaged, cut short or edited."""


def sealed(data: bytes, **header) -> bytes:
    """`data` behind a one-line JSON header holding its size and SHA-256 (and `header`, e.g. run id, step):
    a checkpoint that tells by itself whether it is whole."""
    header = dict(header, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return SEAL + json.dumps(header).encode() + b"\n" + data


def unsealed(blob: bytes, path) -> tuple:
    """(header, data) of a sealed file's bytes, or (None, blob) for a file written without a seal. Raises
    SealError naming `path` when the bytes do not match the header."""
    if not blob.startswith(SEAL):
        return None, blob
    line, _, data = blob[len(SEAL):].partition(b"\n")
    try:
        header = json.loads(line)
    except ValueError:
        raise SealError(f"{path} has a damaged header") from None
    if not isinstance(header, dict) or len(data) != header.get("size") or \
            hashlib.sha256(data).hexdigest() != header.get("sha256"):
        raise SealError(f"{path} does not match the size and checksum recorded when it was written (damaged or cut "
                        "short)")
    return header, data


# ---- what a run is and what it read -------------------------------------------------------------------

def new_run_id() -> str:
    return uuid.uuid4().hex


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_record(path: str | os.PathLike) -> dict:
    """{path (absolute), size, sha256} of an input file; a folder (the iso17x data set) also lists each
    file in it the same way, so a change names the file."""
    path = Path(path).resolve()
    if path.is_dir():
        files = {str(p.relative_to(path)): input_record(p) for p in sorted(path.rglob("*")) if p.is_file()}
        digest = hashlib.sha256("".join(f"{name}|{r['sha256']}\n" for name, r in files.items()).encode())
        return {"path": str(path), "size": sum(r["size"] for r in files.values()), "sha256": digest.hexdigest(),
                "files": files}
    return {"path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)}


def changed_inputs(records: Iterable[dict]) -> list:
    """One line for each recorded input that is missing or differs now (empty: all as recorded)."""
    problems = []
    for record in records:
        path = Path(record["path"])
        if not path.exists():
            problems.append(f"{path} is gone")
        elif "files" in record:
            now = input_record(path)["files"]
            problems += changed_inputs(record["files"].values())
            problems += [f"{path / name} is new" for name in sorted(set(now) - set(record["files"]))]
        else:
            size = path.stat().st_size
            if size != record["size"]:
                problems.append(f"{path} changed size ({record['size']} -> {size} bytes)")
            elif file_sha256(path) != record["sha256"]:
                problems.append(f"{path} has the same size but other content (SHA-256 differs)")
    return problems


NEW_RUN = "--overwrite, or another output folder"     # how a command starts afresh (refine: another --out)


def require_inputs(records: Iterable[dict], out: str | os.PathLike, new_run: str = NEW_RUN) -> None:
    """Refuse a resume whose inputs are not those the run started with, naming each file."""
    problems = changed_inputs(records)
    if problems:
        raise RunFolderError(f"cannot resume {out}: its inputs are not those it started with: {'; '.join(problems)}. "
                             "A resume continues exactly the run it names: restore the file(s), or start a new run "
                             f"({new_run})")


def require_settings(recorded: dict, now: dict, out: str | os.PathLike, new_run: str = NEW_RUN) -> None:
    """Refuse a resume asked with other settings than the run recorded when it started, naming each. Only the
    keys of `now` are compared: what may change on a resume is left out of it by the caller."""
    def shown(value):               # a SHA-256 by its first 12 digits, like git
        digest = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
        return f"{value[:12]}…" if digest else repr(value)

    problems = [f"{key} (recorded {shown(recorded.get(key))}, now {shown(value)})" for key, value in now.items()
                if recorded.get(key) != value]
    if problems:
        raise RunFolderError(f"cannot resume {out}: it was started with other settings: {'; '.join(problems)}. "
                             "A resume continues exactly the run it names: ask for what it recorded, or start a new "
                             f"run ({new_run})")


def arrays_sha256(*arrays) -> str:
    """SHA-256 of inputs handed over in memory rather than as a file (frames to label, a data set after its
    selection): each array's type, shape and bytes."""
    import numpy as np

    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# ---- a folder for a new run ---------------------------------------------------------------------------

def claim(folder: str | os.PathLike, record: str, owned: Sequence[str], command: str, overwrite: bool) -> Path:
    """Make `folder` ready for a new run of `command`, whose record file is `record` (run.json,
    config.json, ...) and which writes the files (or glob patterns) `owned`. Call it holding the lock.

    A folder with a record holds a run: refused unless `overwrite`. A folder without one but with files the
    command would write holds someone's own files: refused unless `overwrite`. With `overwrite`, the old
    run's files (owned, its record, checkpoints included) are removed before anything new is written;
    other files in the folder are left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    present = sorted({p.name for pattern in (record, *owned) for p in folder.glob(pattern) if p.exists()})
    if present and not overwrite:
        if (folder / record).exists():
            raise RunFolderError(f"{folder} already holds a run ({command}: {record}); continue it with --resume, "
                                 "replace it with --overwrite, or choose another output folder")
        raise RunFolderError(f"{folder} holds files that {command} would write ({', '.join(present)}) but no "
                             f"{record}: your own files, or those of a {command} killed before its run had started "
                             "(nothing to resume). They were left untouched; choose another output folder, or pass "
                             "--overwrite to replace them")
    for name in present:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    return folder


def replace_outputs(folder: str | os.PathLike, names: Sequence[str], overwrite: bool, command: str) -> Path:
    """For commands that write a fixed set of files into a folder and do not resume (analyze, compare): a folder
    holding any of them, an earlier output of the same command included, is refused unless `overwrite`; with it
    they are all removed first, so no file of the earlier output (a plot the new one lacks) is left beside the new
    ones. Other files in the folder are left alone. Call it holding the lock."""
    folder = Path(folder)
    present = [folder / name for name in names if (folder / name).exists()]
    if present and not overwrite:
        raise RunFolderError(f"{folder} already holds {', '.join(p.name for p in present)}, which {command} would "
                             f"write (an earlier {command} output, or files of your own); pass --overwrite to replace "
                             "them, or choose another --out")
    for path in present:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def refuse_existing(paths: Sequence[str | os.PathLike], overwrite: bool, what: str = "output") -> None:
    """For commands that write named files (evaluate --json, analyze/compare outputs): an existing file is
    replaced only when asked."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise RunFolderError(f"{', '.join(existing)} already exist(s); this {what} would replace it: pass --overwrite "
                             "to replace it, or choose another path")
