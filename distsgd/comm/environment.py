"""torchrun's environment, read for code outside `comm/torch`: the communicator it describes.

A process that torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), or one whose
user initialised torch.distributed's default group, gets a `TorchComm` joined to that job; any
other gets None. The drop-in `DistributedOptimizer` asks here, so it never names a backend, and
the torch backend's modules load only when the environment asks for them.
"""

from __future__ import annotations

from distsgd.comm.base import Comm


def from_environment(timeout: float = 300.0, device: str = "cpu") -> Comm | None:
    """The communicator of this torchrun worker, or None outside torchrun. Every rank must
    end with `shutdown(comm)`."""
    from distsgd.comm.torch.group import from_torchrun_env

    return from_torchrun_env(timeout, device)


def shutdown(comm: Comm) -> None:
    """End this process's part of a job `from_environment` joined (collective: every rank)."""
    from distsgd.comm.torch import TorchComm
    from distsgd.comm.torch.group import shutdown as end

    if not isinstance(comm, TorchComm):
        raise TypeError(f"shutdown: {type(comm).__name__} did not come from from_environment")
    end(comm)
