"""Wire format: one packed byte buffer per message.  No pickle anywhere.

Layout (little endian)::

    offset 0   u32  magic   0x454F4D41 (b"AMOE")
           4   u16  version (1)
           6   u16  flags   (0, reserved)
           8   u32  tag
          12   u32  header_len  (bytes of UTF-8 JSON)
          16   u64  payload_len (bytes after payload_start)
          24   header JSON  {"h": <user header>, "t": [[dtype, [shape...], offset], ...]}
          payload_start = align(24 + header_len, 64)
          payload_start + offset_i: raw bytes of tensor i (C order), each
          tensor offset aligned to 64 bytes.

The frame length must equal ``payload_start + payload_len`` exactly.

Tensors are reconstructed zero-copy as views into the receive buffer
(``torch.frombuffer``/``torch.from_numpy`` + ``view(dtype)`` + ``view(shape)``);
a tensor is cloned only if its address is not aligned to its item size.
bfloat16 (no MPI datatype) travels as raw bytes like everything else.
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Sequence

import numpy as np
import torch

from .base import TransportError

MAGIC = 0x454F4D41  # b"AMOE" little endian
VERSION = 1
PREFIX = struct.Struct("<IHHIIQ")
PREFIX_SIZE = PREFIX.size  # 24
ALIGN = 64
MAX_HEADER = 64 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def dtype_name(dt: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dt]
    except KeyError:
        raise TransportError(f"unsupported tensor dtype {dt} "
                             f"(supported: {', '.join(DTYPES)})") from None


def encode_header(tag: int, header: dict, meta: list) -> bytes:
    if not isinstance(header, dict):
        raise TransportError(f"header must be a dict, got {type(header).__name__}")
    try:
        return json.dumps({"h": header, "t": meta}, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise TransportError(f"header (tag {tag}) is not JSON-serialisable: {e}") from None


def _default_alloc(n: int) -> np.ndarray:
    return np.empty(n, dtype=np.uint8)


def pack(tag: int, header: dict, tensors: Sequence[torch.Tensor] = (),
         alloc: Callable[[int], np.ndarray] = _default_alloc) -> np.ndarray:
    """Pack a message into a new uint8 numpy buffer of exactly the frame size.

    ``alloc(n)`` must return a writable contiguous uint8 numpy array with at
    least n bytes (e.g. from a buffer pool); the returned frame is ``buf[:n]``
    (a view, its ``.base`` is the allocated buffer).  Tensors are copied, so
    the caller may mutate them once pack() returns.
    """
    if not isinstance(tag, int) or isinstance(tag, bool) or not 0 <= tag < 2**32:
        raise TransportError(f"tag must be an int in [0, 2**32), got {tag!r}")
    copies: list[tuple[torch.Tensor, int, int]] = []  # (tensor, offset, bytes) of the non-empty ones
    meta: list = []
    off = plen = 0
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TransportError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        name = dtype_name(t.dtype)
        if t.requires_grad:
            t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        nb = t.numel() * ITEMSIZE[name]
        meta.append([name, list(t.shape), off])
        if nb:
            copies.append((t, off, nb))
            plen = off + nb  # payload_len: up to the end of the last tensor (no trailing padding)
        off = _align(off + nb)
    hbytes = encode_header(tag, header, meta)
    hlen = len(hbytes)
    if hlen > MAX_HEADER:
        raise TransportError(f"header too large ({hlen} bytes)")
    pstart = _align(PREFIX_SIZE + hlen)
    total = pstart + plen
    frame = alloc(total)[:total]
    PREFIX.pack_into(frame, 0, MAGIC, VERSION, 0, tag, hlen, plen)
    frame.data[PREFIX_SIZE:PREFIX_SIZE + hlen] = hbytes
    if copies:
        # Each tensor is copied straight into a typed view of its slot (offsets are 64-byte
        # aligned), strided sources included: no intermediate contiguous copy.
        dst = torch.from_numpy(frame)
        for t, o, nb in copies:
            dst[pstart + o: pstart + o + nb].view(t.dtype).view(t.shape).copy_(t)
    return frame


def unpack(buf) -> tuple[int, dict, list[torch.Tensor]]:
    """Parse a frame; return (tag, header, tensors).

    ``buf`` is a writable buffer (numpy uint8 array, bytearray, memoryview).
    The returned tensors are views into ``buf`` where alignment allows.
    Raises TransportError on any malformed frame.
    """
    if isinstance(buf, np.ndarray):
        arr = buf.reshape(-1).view(np.uint8)
    else:
        try:
            arr = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise TransportError(f"cannot read frame buffer: {e}") from None
    n = arr.nbytes
    if n < PREFIX_SIZE:
        raise TransportError(f"frame too short ({n} bytes, need at least {PREFIX_SIZE})")
    magic, version, _flags, tag, hlen, plen = PREFIX.unpack_from(arr, 0)
    if magic != MAGIC:
        raise TransportError(f"bad frame magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
    if version != VERSION:
        raise TransportError(f"unsupported frame version {version} (expected {VERSION})")
    if PREFIX_SIZE + hlen > n:
        raise TransportError(f"frame header length {hlen} exceeds frame size {n}")
    pstart = _align(PREFIX_SIZE + hlen)
    if pstart + plen != n:
        raise TransportError(
            f"frame length mismatch: {n} bytes but header says {pstart + plen}")
    try:
        obj = json.loads(arr[PREFIX_SIZE:PREFIX_SIZE + hlen].tobytes())
    except (UnicodeDecodeError, ValueError) as e:
        raise TransportError(f"frame header is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("h"), dict) \
            or not isinstance(obj.get("t"), list):
        raise TransportError("frame header has wrong structure")
    tensors: list[torch.Tensor] = []
    base = None
    for i, m in enumerate(obj["t"]):
        try:
            name, shape, off = m
            dt = DTYPES[name]
            shape = [int(s) for s in shape]
            off = int(off)
        except (TypeError, ValueError, KeyError):
            raise TransportError(f"bad tensor descriptor {i}: {m!r}") from None
        if any(s < 0 for s in shape) or off < 0:
            raise TransportError(f"bad tensor descriptor {i}: {m!r}")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = ITEMSIZE[name]
        nb = numel * itemsize
        if nb == 0:
            tensors.append(torch.empty(shape, dtype=dt))
            continue
        if off + nb > plen:
            raise TransportError(
                f"tensor {i} ({name}{shape}) at offset {off} overruns payload of {plen} bytes")
        if base is None:
            base = torch.from_numpy(arr) if arr.flags.writeable else torch.from_numpy(arr.copy())
        seg = base[pstart + off: pstart + off + nb]
        if seg.data_ptr() % itemsize:
            seg = seg.clone()
        tensors.append(seg.view(dt).view(shape))
    return tag, obj["h"], tensors
