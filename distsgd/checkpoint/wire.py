"""A checkpoint's pieces sent between ranks (gathering one on real processes), never pickled.

The message is one uint8 tensor: 8 bytes of skeleton length, a JSON skeleton of the containers and
numbers, then the tensors' raw bytes in order, each checked against the skeleton when read, so a
malformed or hostile message is a `CheckpointError` and never runs code.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from distsgd.errors import CheckpointError

_WIRE_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def to_bytes(value: Any) -> torch.Tensor:
    """`capture`'s output as one uint8 tensor: 8 bytes of skeleton length, the JSON skeleton,
    then every tensor's bytes in order."""
    tensors: list[torch.Tensor] = []
    skeleton = json.dumps(_encode(value, tensors)).encode()
    parts = [torch.tensor(list(len(skeleton).to_bytes(8, "little")), dtype=torch.uint8),
             torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)]
    parts += [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts)


def from_bytes(blob: torch.Tensor) -> Any:
    """The value `to_bytes` encoded; `CheckpointError` for anything malformed."""
    raw = blob.numpy().tobytes()
    size = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or size > len(raw) - 8:
        raise CheckpointError(f"a checkpoint message of {len(raw)} bytes is malformed")
    cursor = [8 + size]
    try:
        value = _decode(json.loads(raw[8: 8 + size]), raw, cursor)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"a checkpoint message is malformed: {type(e).__name__}") from None
    if cursor[0] != len(raw):
        raise CheckpointError("a checkpoint message has bytes its skeleton does not account for")
    return value


def _encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        if str(value.dtype).removeprefix("torch.") not in _WIRE_DTYPES:
            raise TypeError(f"cannot send a {value.dtype} tensor in a checkpoint")
        tensors.append(value)
        return {"t": [str(value.dtype).removeprefix("torch."), list(value.shape)]}
    if isinstance(value, dict):
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    for tag, kind in (("l", list), ("u", tuple), ("s", set)):
        if isinstance(value, kind):
            return {tag: [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} in a checkpoint")


def _decode(node: Any, raw: bytes, cursor: list[int]) -> Any:
    if not isinstance(node, dict):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise CheckpointError(f"a checkpoint message holds an unexpected {type(node).__name__}")
    if len(node) != 1 or next(iter(node)) not in ("t", "d", "l", "u", "s"):
        raise CheckpointError("a checkpoint message holds an unknown container")
    (tag, body), = node.items()
    if tag == "t":
        return _decode_tensor(body, raw, cursor)
    if not isinstance(body, list):
        raise CheckpointError("a checkpoint message holds a malformed container")
    if tag == "d":
        if not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise CheckpointError("a checkpoint message holds a malformed dict")
        pairs = [(_decode(k, raw, cursor), _decode(v, raw, cursor)) for k, v in body]
        if not all(k is None or isinstance(k, (bool, int, float, str)) for k, _ in pairs):
            raise CheckpointError("a checkpoint message holds a dict with unhashable keys")
        return dict(pairs)
    items = [_decode(v, raw, cursor) for v in body]
    return {"l": list, "u": tuple, "s": set}[tag](items)


def _decode_tensor(body: Any, raw: bytes, cursor: list[int]) -> torch.Tensor:
    ok = (isinstance(body, list) and len(body) == 2 and body[0] in _WIRE_DTYPES
          and isinstance(body[1], list)
          and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in body[1]))
    if not ok:
        raise CheckpointError(f"a checkpoint message holds a malformed tensor header {body!r:.80}")
    dtype, shape = _WIRE_DTYPES[body[0]], body[1]
    numel = 1
    for n in shape:
        numel *= n
    size = numel * torch.empty(0, dtype=dtype).element_size()
    start = cursor[0]
    if start + size > len(raw):
        raise CheckpointError("a checkpoint message is shorter than its tensors")
    cursor[0] = start + size
    if not size:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw[start: start + size]), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).clone()
