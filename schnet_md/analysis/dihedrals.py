"""Rotatable heavy-atom dihedrals, their conformational states and transitions.

A dihedral's state is assigned with hysteresis (transition-based assignment): a frame belongs to the
state whose core (centre +- half-width) it last entered, so thermal noise around a barrier top is not
counted as a transition; only core-to-core moves are."""

from __future__ import annotations

from collections import Counter
from typing import List, Sequence, Tuple

import mdtraj
import networkx as nx
import numpy as np

STAGGERED = (60.0, 180.0, 300.0)   # gauche+, trans, gauche-
STATE_NAMES = {60.0: "g+", 180.0: "t", 300.0: "g-"}
CORE_HALF_WIDTH = 35.0


LINEAR_ANGLE_DEG = 165.0   # a dihedral through a near-linear unit (e.g. C-C#C) is undefined


def rotatable_dihedrals(topology: mdtraj.Topology, xyz: np.ndarray | None = None) -> Tuple[np.ndarray, List[str]]:
    """One heavy-atom dihedral a-b-c-d per rotatable bond b-c: b and c heavy, the bond not in a ring,
    each of b, c with another heavy neighbour (a, d: the heaviest, then lowest index). Given positions
    `xyz` [atoms, 3] (e.g. the first frame), choices of a, d that make a bond angle above 165° are skipped,
    and a bond with no other choice (across or beside a triple bond) is not rotatable."""
    graph = topology.to_bondgraph()
    heavy = {a for a in topology.atoms if a.element.symbol != "H"}
    quads, names = [], []
    for b, c in graph.edges():
        if b not in heavy or c not in heavy:
            continue
        g = graph.copy()
        g.remove_edge(b, c)
        if nx.has_path(g, b, c):
            continue   # ring bond
        if _is_amide(graph, b, c):
            continue   # C(=O)-N: partial double bond, planar (peptide backbones are followed as phi/psi)
        if b.index > c.index:
            b, c = c, b
        # compare atoms by index: a copied topology's bond graph may hold other Atom objects for the same atoms
        a_side = sorted((n for n in graph.neighbors(b) if n in heavy and n.index != c.index),
                        key=lambda n: (-n.element.mass, n.index))
        d_side = sorted((n for n in graph.neighbors(c) if n in heavy and n.index != b.index),
                        key=lambda n: (-n.element.mass, n.index))
        a = next((n for n in a_side if xyz is None or _angle(xyz, n.index, b.index, c.index) < LINEAR_ANGLE_DEG), None)
        d = next((n for n in d_side if xyz is None or _angle(xyz, b.index, c.index, n.index) < LINEAR_ANGLE_DEG), None)
        if a is None or d is None:
            continue
        quad = (a.index, b.index, c.index, d.index)
        quads.append(quad)
        names.append("-".join(topology.atom(k).name for k in quad))
    order = sorted(range(len(quads)), key=lambda k: quads[k][1:3])
    return np.array([quads[k] for k in order], dtype=np.int64).reshape(-1, 4), [names[k] for k in order]


def _is_amide(graph, b, c) -> bool:
    """b-c is a carbonyl carbon bonded to nitrogen (either order): C has a one-neighbour O, the other is N."""
    for carbon, other in ((b, c), (c, b)):
        if carbon.element.symbol == "C" and other.element.symbol == "N" and any(
                n.element.symbol == "O" and graph.degree(n) == 1 for n in graph.neighbors(carbon)):
            return True
    return False


def backbone_phi_psi(traj: mdtraj.Trajectory):
    """mdtraj's backbone phi and psi of the residues that have both: (phi deg [frames, r], psi deg, labels);
    empty arrays for anything that is not a peptide."""
    phi_idx, phi = mdtraj.compute_phi(traj)
    psi_idx, psi = mdtraj.compute_psi(traj)
    if len(phi_idx) == 0 or len(psi_idx) == 0:
        return np.zeros((traj.n_frames, 0)), np.zeros((traj.n_frames, 0)), []
    # phi (C_prev, N, CA, C) and psi (N, CA, C, N_next) belong to the residue of their CA (atom 2 / 1)
    phi_of = {int(q[2]): k for k, q in enumerate(phi_idx)}
    psi_of = {int(q[1]): k for k, q in enumerate(psi_idx)}
    shared = sorted(set(phi_of) & set(psi_of))
    labels = [str(traj.topology.atom(ca).residue) for ca in shared]
    return (np.degrees(phi[:, [phi_of[ca] for ca in shared]]), np.degrees(psi[:, [psi_of[ca] for ca in shared]]),
            labels)


def _angle(xyz: np.ndarray, i: int, j: int, k: int) -> float:
    u, v = xyz[i] - xyz[j], xyz[k] - xyz[j]
    return float(np.degrees(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1.0, 1.0))))


def dihedral_angles(traj: mdtraj.Trajectory, quads: np.ndarray) -> np.ndarray:
    """[frames, dihedrals] angles in degrees, in [0, 360)."""
    if len(quads) == 0:
        return np.zeros((traj.n_frames, 0))
    return np.degrees(mdtraj.compute_dihedrals(traj, quads)) % 360.0


def assign_states(angles_deg: np.ndarray, centers: Sequence[float] = STAGGERED,
                  half_width: float = CORE_HALF_WIDTH) -> np.ndarray:
    """State index (into `centers`) of every frame, with hysteresis; -1 before the first core is reached."""
    centers = np.asarray(centers)
    diff = np.abs((angles_deg[:, None] - centers[None, :] + 180.0) % 360.0 - 180.0)
    in_core = np.where(diff.min(axis=1) < half_width, diff.argmin(axis=1), -1)
    states = np.empty(len(angles_deg), dtype=np.int64)
    current = -1
    for t, s in enumerate(in_core):
        if s >= 0:
            current = s
        states[t] = current
    return states


def transitions(states: np.ndarray) -> List[Tuple[int, int, int]]:
    """(frame, from state, to state) for every core-to-core change."""
    out = []
    for t in range(1, len(states)):
        if states[t] != states[t - 1] and states[t - 1] >= 0:
            out.append((t, int(states[t - 1]), int(states[t])))
    return out


def conformer_populations(state_matrix: np.ndarray, centers: Sequence[float] = STAGGERED) -> List[Tuple[str, float]]:
    """Conformers as combinations of dihedral states, with the fraction of frames in each (descending)."""
    if state_matrix.shape[1] == 0:
        return [("(no rotatable dihedral)", 1.0)]
    labels = [STATE_NAMES.get(float(c), f"{c:g}") for c in centers]
    names = [",".join("?" if s < 0 else labels[s] for s in row) for row in state_matrix]
    counts = Counter(names)
    total = len(names)
    return [(name, count / total) for name, count in counts.most_common()]
