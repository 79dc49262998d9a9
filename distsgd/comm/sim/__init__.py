"""The simulator: N workers in one process, a virtual clock, a network model and a compute model."""

from distsgd.comm.sim.compute import ComputeModel, Jitter, Slowdown
from distsgd.comm.sim.world import Link, NetworkModel, SimComm, SimWorld

__all__ = ["ComputeModel", "Jitter", "Link", "NetworkModel", "SimComm", "SimWorld", "Slowdown"]
