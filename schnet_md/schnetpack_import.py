"""Bring a SchNet trained with schnetpack 2.x into schnet-md (then OpenMM, ASE, LAMMPS).

Two steps:
  extract(nnp) -> plain dict      reads a live schnetpack NeuralNetworkPotential (needs schnetpack to
                                  unpickle the model file; the function itself only reads attributes)
  convert(extracted, elements)    builds the equivalent schnet-md SchNet (needs nothing but torch)

schnetpack's SchNet differs from the paper in ways schnet-md supports as options, not approximations:
the filter network ends in a linear layer (filter_activation="none"), the filter width may differ from
the feature width (n_filters), Atomwise defaults to SiLU (readout_activation="silu"), and the energy
offsets are AddOffsets' mean per atom and atom references. What cannot be represented (electronic
embeddings, other activations, trainable non-uniform Gaussian widths, a non-cosine cutoff, ...) is
refused with a clear error.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .model import SchNet, SchNetConfig
from .units import LENGTH_UNITS

FORMAT = "schnet-md/schnetpack-extract"


class SchnetpackImportError(ValueError):
    """A schnetpack model that schnet-md cannot reproduce exactly."""


def _activation_name(act) -> str:
    if act is None:
        return "none"
    name = getattr(act, "__name__", type(act).__name__).lower()
    if name in ("identity",):
        return "none"
    if "shifted_softplus" in name or name == "shiftedsoftplus":
        return "ssp"
    if name in ("silu", "swish"):
        return "silu"
    return name


def _dense(module) -> dict:
    return {"weight": module.weight.detach().cpu().double(),
            "bias": None if module.bias is None else module.bias.detach().cpu().double(),
            "activation": _activation_name(getattr(module, "activation", None))}


def extract(nnp) -> dict:
    """Everything convert() needs from a schnetpack NeuralNetworkPotential, as plain tensors and values."""
    rep = nnp.representation
    if type(rep).__name__ != "SchNet":
        raise SchnetpackImportError(f"the representation is {type(rep).__name__}, not schnetpack's SchNet")
    if len(getattr(rep, "electronic_embeddings", [])):
        raise SchnetpackImportError("electronic (charge/spin) embeddings have no schnet-md counterpart")
    if type(rep.embedding).__name__ != "Embedding":
        raise SchnetpackImportError(f"nuclear embedding {type(rep.embedding).__name__} is not supported")
    rbf, cutoff_fn = rep.radial_basis, rep.cutoff_fn
    if type(rbf).__name__ != "GaussianRBF":
        raise SchnetpackImportError(f"radial basis {type(rbf).__name__} is not supported (GaussianRBF only)")
    if type(cutoff_fn).__name__ != "CosineCutoff":
        raise SchnetpackImportError(f"cutoff function {type(cutoff_fn).__name__} is not supported (CosineCutoff only)")
    blocks = []
    for block in rep.interactions:
        blocks.append({"in2f": _dense(block.in2f), "filter1": _dense(block.filter_network[0]),
                       "filter2": _dense(block.filter_network[1]), "out1": _dense(block.f2out[0]),
                       "out2": _dense(block.f2out[1])})
    atomwise = [m for m in nnp.output_modules if type(m).__name__ == "Atomwise"]
    if len(atomwise) != 1:
        raise SchnetpackImportError("expected exactly one Atomwise output module (the energy)")
    atomwise = atomwise[0]
    if atomwise.aggregation_mode != "sum" or atomwise.n_out != 1:
        raise SchnetpackImportError("the Atomwise energy head must sum one output per atom")
    layers = [m for m in atomwise.outnet if hasattr(m, "weight")]
    scale = 1.0
    for m in list(nnp.output_modules) + list(getattr(nnp, "postprocessors", [])):
        if type(m).__name__ == "ScaleProperty" and m.output_key == atomwise.output_key:
            scale *= float(m.scale)
    mean, atomref = 0.0, None
    for m in getattr(nnp, "postprocessors", []):
        if type(m).__name__ == "AddOffsets" and m._property == atomwise.output_key:
            if m.add_mean:
                if not m.is_extensive:
                    raise SchnetpackImportError("an intensive energy offset is not supported")
                mean += float(m.mean.reshape(-1)[0])
            if m.add_atomrefs:
                atomref = m.atomref.detach().cpu().double()
    return {
        "format": FORMAT,
        "n_atom_basis": int(rep.n_atom_basis), "n_filters": int(rep.n_filters),
        "n_interactions": len(blocks), "cutoff": float(cutoff_fn.cutoff),
        "rbf_offsets": rbf.offsets.detach().cpu().double(), "rbf_widths": rbf.widths.detach().cpu().double(),
        "embedding": rep.embedding.weight.detach().cpu().double(),
        "interactions": blocks, "readout": [_dense(m) for m in layers],
        "scale": scale, "mean_per_atom": mean, "atomref": atomref,
    }


def convert(extracted: dict, elements: Sequence[int], energy_unit: str = "eV", length_unit: str = "Angstrom") -> SchNet:
    """A schnet-md SchNet that computes what the extracted schnetpack model computes."""
    if extracted.get("format") != FORMAT:
        raise SchnetpackImportError("not an extracted schnetpack model (run schnet_md.schnetpack_import.extract)")
    to_angstrom = LENGTH_UNITS[length_unit] if length_unit in LENGTH_UNITS else None
    if to_angstrom is None:
        raise SchnetpackImportError(f"unknown length unit {length_unit!r}; known: {', '.join(LENGTH_UNITS)}")
    offsets, widths = extracted["rbf_offsets"], extracted["rbf_widths"]
    if not torch.allclose(widths, widths[0].expand_as(widths), rtol=1e-6):
        raise SchnetpackImportError("Gaussian widths differ between basis functions (trainable widths); "
                                    "schnet-md uses one width")
    for block in extracted["interactions"]:
        acts = (block["filter1"]["activation"], block["filter2"]["activation"], block["out1"]["activation"],
                block["out2"]["activation"], block["in2f"]["activation"])
        if acts != ("ssp", "none", "ssp", "none", "none") or block["in2f"]["bias"] is not None:
            raise SchnetpackImportError(f"interaction activations {acts} differ from schnetpack's SchNet defaults "
                                        "(ssp, linear, ssp, linear, linear)")
    readout = extracted["readout"]
    n = extracted["n_atom_basis"]
    if len(readout) != 2 or tuple(readout[0]["weight"].shape) != (n // 2, n) or readout[1]["activation"] != "none" \
            or readout[0]["activation"] not in ("ssp", "silu"):
        raise SchnetpackImportError("the Atomwise head must be the default 2-layer pyramid n -> n/2 -> 1 with "
                                    "shifted softplus or SiLU")
    elements = sorted(int(z) for z in elements)
    embedding = extracted["embedding"]
    if max(elements) >= embedding.shape[0]:
        raise SchnetpackImportError(f"the model embeds atomic numbers below {embedding.shape[0]}")
    config = SchNetConfig(
        elements=elements, n_features=n, n_interactions=extracted["n_interactions"], n_gaussians=len(offsets),
        mu_min=float(offsets[0]) * to_angstrom, mu_max=float(offsets[-1]) * to_angstrom,
        gamma=0.5 / (float(widths[0]) * to_angstrom) ** 2, cutoff=extracted["cutoff"] * to_angstrom,
        cutoff_function="cosine", energy_unit=energy_unit, preset="schnetpack",
        n_filters=extracted["n_filters"], filter_activation="none", readout_activation=readout[0]["activation"])
    model = SchNet(config).double()
    state = model.state_dict()
    state["expansion.mu"] = offsets * to_angstrom
    state["embedding.weight"] = embedding[elements]
    for k, block in enumerate(extracted["interactions"]):
        p = f"interactions.{k}."
        state[p + "cfconv.in2f.weight"] = block["in2f"]["weight"]
        for ours, theirs in (("cfconv.filter_network.dense1", "filter1"), ("cfconv.filter_network.dense2", "filter2"),
                             ("dense1", "out1"), ("dense2", "out2")):
            state[p + ours + ".weight"] = block[theirs]["weight"]
            state[p + ours + ".bias"] = block[theirs]["bias"]
    state["readout.dense1.weight"], state["readout.dense1.bias"] = readout[0]["weight"], readout[0]["bias"]
    state["readout.dense2.weight"], state["readout.dense2.bias"] = readout[1]["weight"], readout[1]["bias"]
    state["readout.scale"] = torch.tensor(extracted["scale"], dtype=torch.float64)
    state["readout.shift"] = torch.tensor(extracted["mean_per_atom"], dtype=torch.float64)
    atomref = extracted["atomref"]
    state["readout.reference_energies"] = torch.zeros(len(elements), dtype=torch.float64) if atomref is None \
        else atomref[elements].double()
    model.load_state_dict(state)
    return model.eval()


def import_model_file(path, elements: Sequence[int], energy_unit: str = "eV", length_unit: str = "Angstrom") -> SchNet:
    """Read a schnetpack model file (a pickled NeuralNetworkPotential, e.g. `best_model`). Unpickling runs
    code from the file and needs schnetpack installed: use it only on files you trust."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return convert(obj, elements, energy_unit, length_unit)
    return convert(extract(obj), elements, energy_unit, length_unit)


__all__ = ["extract", "convert", "import_model_file", "SchnetpackImportError"]
