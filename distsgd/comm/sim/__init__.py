"""The simulator: N workers in one process, a virtual clock, a network model and a compute model.

`network` (links, NICs, what messages and collectives cost), `scheduler` (workers as greenlets,
run one at a time in virtual time order), `world` (SimWorld: the verbs' effects, checkpoint state),
`simcomm` (each worker's `Comm`), `compute` (how long a step takes in virtual time).
"""

from distsgd.comm.sim.compute import ComputeModel, Jitter, Slowdown
from distsgd.comm.sim.network import Link, NetworkModel
from distsgd.comm.sim.simcomm import SimComm
from distsgd.comm.sim.world import SimWorld

__all__ = ["ComputeModel", "Jitter", "Link", "NetworkModel", "SimComm", "SimWorld", "Slowdown"]
