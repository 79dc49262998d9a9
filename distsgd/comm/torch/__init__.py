"""Real processes over torch.distributed, one concept per module:

- `wire`: the message format (header, magic number, limits) and its checks on arrival;
- `mailbox`: the point-to-point transport over gloo (the any-source mailbox, the outbox);
- `exchange`: `exchange`'s receives, posted ahead of their messages;
- `collectives`: all-reduce, broadcast, barrier and groups;
- `comm`: `TorchComm`, the `Comm` verbs, deaths and the close protocol;
- `group`: process-group set-up, rendezvous and torchrun's environment.
"""

from distsgd.comm.torch.comm import Supervisor, TorchComm
from distsgd.comm.torch.mailbox import PeerLost
from distsgd.comm.torch.wire import parse_header

__all__ = ["PeerLost", "Supervisor", "TorchComm", "parse_header"]
