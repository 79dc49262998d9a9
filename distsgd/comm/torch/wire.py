"""The wire format of TorchComm's point-to-point messages, and its checks on arrival.

Each message is a fixed header of `HEADER_LEN` int64 on gloo tag `HEADER_TAG`, then (unless it
is empty or a goodbye) its payload as raw bytes on `PAYLOAD_TAG`. The messages of `exchange`
(posted-ahead receives: the receiver knows each sender and layout) are on a channel of their own
with their own numbers: below `SPLIT_BYTES` of payload one buffer, the header then the payload
(`packed`), on tag `X_TAG`; from `SPLIT_BYTES` on the header on `X_TAG`, then the payload on
`X_BODY_TAG`, which the receiver takes straight into its own tensor and a blocking `exchange`
sends straight from the caller's (no copy: a copy of a large payload costs more than a second
message).
The header holds: the magic number, the kind, a dtype code, the number of dimensions, a
sequence number (per channel, sender and receiver), the shape padded to `MAX_DIMS`, and the magic
again. gloo part-fills a larger receive buffer without saying so; the trailer (zeroed before each
receive) shows that a header arrived whole.

Hostile input: nothing received is unpickled, and `parse_header` checks every field and the
payload's size against `MAX_MESSAGE_BYTES` before a byte of payload is allocated.
"""

from __future__ import annotations

import torch

from distsgd.errors import UsageError

HEADER_TAG, PAYLOAD_TAG = 7101, 7102  # gloo tags of distsgd's messages
X_TAG = 7103  # ... and of exchange's, never mixed with the others
X_BODY_TAG = 7104  # ... and of exchange's payloads of SPLIT_BYTES or more (sent apart)
# Measured on loopback, 2 busy cores (benchmarks.p2p_costs --loopback, k into one): at 64 KiB
# one message and its two copies cost what two messages and none do (exchange sends a split
# message from the caller's tensor); at 1.2 MB splitting cuts exchange from 1.3-1.6× to
# 1.2-1.4× raw gloo.
SPLIT_BYTES = 1 << 16
MAGIC = 0x6473_6764_0001  # "dsgd", wire version 1: anything else is not our message
DATA, GOODBYE, REPORT = 0, 1, 2  # REPORT: evaluation reports, a channel of their own
KINDS = (DATA, GOODBYE, REPORT)
MAX_DIMS = 8
HEADER_LEN = 6 + MAX_DIMS
HEADER_BYTES = 8 * HEADER_LEN  # a multiple of 16: any dtype's payload may follow it in a buffer
SEQ = 4  # the index of the sequence number in a header
# A header may not make the receiver allocate more than this for one payload (a model of 500 M
# float32 parameters); a larger claim is hostile or corrupt.
MAX_MESSAGE_BYTES = 2**31
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)


def header(kind: int, payload: torch.Tensor | None, number: int = 0) -> torch.Tensor:
    """The header of a message of `kind` carrying `payload` (None: a goodbye), with sequence
    number `number` (`SEQ`; the outbox sets it when it posts the message)."""
    return torch.tensor(_fields(kind, payload, number), dtype=torch.int64)


def packed(payload: torch.Tensor, number: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """One buffer of bytes (`into`, if given, of the right size): the header of a DATA message
    carrying `payload`, then `payload` (copied: the caller may change it at once)."""
    size = HEADER_BYTES + payload.numel() * payload.element_size()
    out = torch.empty(size, dtype=torch.uint8) if into is None else into
    out[:HEADER_BYTES].view(torch.int64).copy_(header(DATA, payload, number))
    if payload.numel():
        out[HEADER_BYTES:].view(payload.dtype).view(payload.shape).copy_(payload.detach())
    return out


def _fields(kind: int, payload: torch.Tensor | None, number: int) -> list[int]:
    dims = [0] * MAX_DIMS
    if payload is None:
        return [MAGIC, kind, 0, 0, number, *dims, MAGIC]
    if payload.dtype not in DTYPES or payload.dim() > MAX_DIMS:
        raise UsageError(f"send: a {payload.dtype} tensor of {payload.dim()} dimensions "
                         f"cannot be sent; supported: up to {MAX_DIMS} dimensions of "
                         f"{', '.join(str(d) for d in DTYPES)}")
    dims[:payload.dim()] = payload.shape
    return [MAGIC, kind, DTYPES.index(payload.dtype), payload.dim(), number, *dims, MAGIC]


def parse_header(values: list[int], limit: int = MAX_MESSAGE_BYTES,
                 ) -> tuple[int, torch.dtype, list[int]]:
    """(kind, dtype, shape) of a received header, or ValueError saying what is wrong with it.

    Checked before anything is allocated: a header is the only thing a sender controls.
    """
    magic, kind, code, ndim, _, *dims, trailer = values
    if magic != MAGIC:
        raise ValueError(f"bad magic number {magic:#x} (expected {MAGIC:#x}: not a distsgd "
                         "message, or another wire version)")
    if trailer != MAGIC:
        raise ValueError(f"a truncated header of {len(values)} int64 (its trailer is "
                         f"{trailer:#x}, not {MAGIC:#x})")
    if kind == GOODBYE:
        return kind, torch.uint8, [0]
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind} (valid: {', '.join(map(str, KINDS))})")
    if not 0 <= code < len(DTYPES):
        raise ValueError(f"unknown dtype code {code} (valid: 0..{len(DTYPES) - 1})")
    if not 0 <= ndim <= MAX_DIMS or any(d < 0 for d in dims) or any(dims[ndim:]):
        raise ValueError(f"bad shape: {ndim} dimensions {dims} (up to {MAX_DIMS} sizes >= 0)")
    size = DTYPES[code].itemsize
    for d in dims[:ndim]:  # multiply with a cap, so a hostile shape cannot overflow int64
        size = min(size * d, limit + 1)
    if size > limit:
        raise ValueError(f"a payload of shape {dims[:ndim]} and dtype {DTYPES[code]} exceeds "
                         f"the limit of {limit} bytes")
    return kind, DTYPES[code], dims[:ndim]
