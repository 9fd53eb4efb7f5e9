"""Trajectory analysis with mdtraj: what the molecule did (schnet-md analyze / compare)."""

from .dihedrals import assign_states, conformer_populations, rotatable_dihedrals, transitions
from .load import LoadedTrajectory, load_trajectory

__all__ = ["LoadedTrajectory", "load_trajectory", "rotatable_dihedrals", "assign_states", "transitions",
           "conformer_populations"]
