"""Real processes over torch.distributed: wire format, mailbox, TorchComm, process-group set-up."""

from distsgd.comm.torch.comm import (
    _HEADER_LEN,
    _HEADER_TAG,
    _MAGIC,
    PeerLost,
    TorchComm,
    parse_header,
)

__all__ = ["_HEADER_LEN", "_HEADER_TAG", "_MAGIC", "PeerLost", "TorchComm", "parse_header"]
