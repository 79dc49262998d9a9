"""Communication backends behind one protocol: the simulator and torch.distributed."""

from distsgd.comm.base import Comm, Group, current, set_current

__all__ = ["Comm", "Group", "current", "set_current"]
