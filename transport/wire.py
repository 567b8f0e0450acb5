"""Wire format: one packed byte buffer per message.  No pickle anywhere.

Layout (little endian)::

    offset 0   u32  magic        0x454F4D41 (b"AMOE")
           4   u16  version      (2)
           6   u16  flags        (0, reserved)
           8   u32  tag
          12   u32  header_len   bytes of UTF-8 JSON; 0 means the empty header {}
          16   u32  num_tensors
          20   u32  table_len    bytes of the tensor table
          24   u64  payload_len  bytes after payload_start
          32   tensor table, per tensor: u8 dtype code, u8 ndim, 6 bytes 0, u64 offset,
               ndim x i64 dims
          32 + table_len: header JSON
          payload_start = align(32 + table_len + header_len, 64)
          payload_start + offset_i: raw bytes of tensor i (C order), each offset 64-byte aligned

The frame length must equal ``payload_start + payload_len`` exactly.

The tensor table is binary and a data-path message's header is a few small ints, so packing
costs a struct call, one memmove per tensor and a short JSON dump (it was a JSON table and a
torch view chain per tensor: ~90 µs per message here, now ~15).  Tensors are reconstructed
zero-copy with one ``torch.frombuffer`` each; a tensor is cloned only if its address is not
aligned to its item size.  bfloat16 (no MPI datatype) travels as raw bytes like everything else.
"""

from __future__ import annotations

import ctypes
import json
import struct
from typing import Callable, Sequence

import numpy as np
import torch

from .base import TransportError

MAGIC = 0x454F4D41  # b"AMOE" little endian
VERSION = 2
PREFIX = struct.Struct("<IHHIIIIQ")
PREFIX_SIZE = PREFIX.size  # 32
ENTRY = struct.Struct("<BB6xQ")  # dtype code, ndim, offset; then ndim x i64
ALIGN = 64
MAX_HEADER = 64 << 20
MAX_NDIM = 16

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
# The code of a dtype on the wire is its index in DTYPES: the order above is the format.
_CODE: dict[torch.dtype, int] = {dt: i for i, dt in enumerate(DTYPES.values())}
_BY_CODE: list[tuple[torch.dtype, int]] = [(dt, ITEMSIZE[n]) for n, dt in DTYPES.items()]
# numpy twin of each dtype (bfloat16 has none: it is read as int16 and viewed back); a numpy
# view plus from_numpy costs a third of torch.frombuffer plus view.
_NP: list[np.dtype] = [np.dtype(n if n != "bfloat16" else "int16").newbyteorder("<") if n != "bool"
                       else np.dtype(np.bool_) for n in DTYPES]
_TABLES: dict[str, struct.Struct] = {}  # struct format of a tensor table -> compiled Struct
_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def dtype_name(dt: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dt]
    except KeyError:
        raise TransportError(f"unsupported tensor dtype {dt} "
                             f"(supported: {', '.join(DTYPES)})") from None


def encode_header(tag: int, header: dict) -> bytes:
    if not isinstance(header, dict):
        raise TransportError(f"header must be a dict, got {type(header).__name__}")
    if not header:
        return b""
    try:
        return _json(header).encode()
    except (TypeError, ValueError) as e:
        raise TransportError(f"header (tag {tag}) is not JSON-serialisable: {e}") from None


def _table_struct(fmt: str) -> struct.Struct:
    s = _TABLES.get(fmt)
    if s is None:
        s = _TABLES[fmt] = struct.Struct(fmt)
    return s


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
    fmt = "<"
    vals: list[int] = []
    off = plen = 0
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TransportError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        code = _CODE.get(t.dtype)
        if code is None:
            dtype_name(t.dtype)  # raises with the supported list
        shape = t.shape
        nd = len(shape)
        if nd > MAX_NDIM:
            raise TransportError(f"tensor {i} has {nd} dims (at most {MAX_NDIM})")
        nb = t.numel() * _BY_CODE[code][1]
        fmt += f"BB6xQ{nd}q" if nd else "BB6xQ"
        vals += (code, nd, off, *shape)
        if nb:
            copies.append((t, off, nb))
            plen = off + nb  # payload_len: up to the end of the last tensor (no trailing padding)
        off = _align(off + nb)
    table = _table_struct(fmt).pack(*vals) if vals else b""
    hbytes = encode_header(tag, header)
    hlen, tlen = len(hbytes), len(table)
    if hlen > MAX_HEADER:
        raise TransportError(f"header too large ({hlen} bytes)")
    pstart = _align(PREFIX_SIZE + tlen + hlen)
    total = pstart + plen
    frame = alloc(total)[:total]
    PREFIX.pack_into(frame, 0, MAGIC, VERSION, 0, tag, hlen, len(tensors), tlen, plen)
    mv = frame.data
    if tlen:
        mv[PREFIX_SIZE:PREFIX_SIZE + tlen] = table
    if hlen:
        mv[PREFIX_SIZE + tlen:PREFIX_SIZE + tlen + hlen] = hbytes
    if copies:
        addr = frame.ctypes.data + pstart
        for t, o, nb in copies:
            if t.is_cpu and t.is_contiguous():
                ctypes.memmove(addr + o, t.data_ptr(), nb)
            else:  # strided or device source: one copy into a typed view of its slot
                dst = torch.from_numpy(frame)[pstart + o: pstart + o + nb]
                dst.view(t.dtype).view(t.shape).copy_(t.detach())
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
    magic, version, _flags, tag, hlen, ntens, tlen, plen = PREFIX.unpack_from(arr, 0)
    if magic != MAGIC:
        raise TransportError(f"bad frame magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
    if version != VERSION:
        raise TransportError(f"unsupported frame version {version} (expected {VERSION})")
    if PREFIX_SIZE + tlen + hlen > n:
        raise TransportError(f"frame header length {tlen + hlen} exceeds frame size {n}")
    pstart = _align(PREFIX_SIZE + tlen + hlen)
    if pstart + plen != n:
        raise TransportError(
            f"frame length mismatch: {n} bytes but header says {pstart + plen}")
    if hlen:
        hstart = PREFIX_SIZE + tlen
        try:
            header = json.loads(arr[hstart:hstart + hlen].tobytes())
        except (UnicodeDecodeError, ValueError) as e:
            raise TransportError(f"frame header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise TransportError("frame header has wrong structure (not a JSON object)")
    else:
        header = {}
    tensors: list[torch.Tensor] = []
    if not ntens:
        if tlen:
            raise TransportError(f"tensor table of {tlen} bytes for 0 tensors")
        return tag, header, tensors
    if not arr.flags.writeable:
        arr = arr.copy()
    p, end = PREFIX_SIZE, PREFIX_SIZE + tlen
    addr = None
    for i in range(ntens):
        if p + ENTRY.size > end:
            raise TransportError(f"tensor table truncated at tensor {i} of {ntens}")
        code, nd, off = ENTRY.unpack_from(arr, p)
        p += ENTRY.size
        if code >= len(_BY_CODE) or nd > MAX_NDIM or p + 8 * nd > end:
            raise TransportError(f"bad tensor descriptor {i}: dtype code {code}, {nd} dims")
        shape = struct.unpack_from(f"<{nd}q", arr, p) if nd else ()
        p += 8 * nd
        dt, itemsize = _BY_CODE[code]
        numel = 1
        for s in shape:
            if s < 0:
                raise TransportError(f"bad tensor descriptor {i}: negative dim in {shape}")
            numel *= s
        nb = numel * itemsize
        if nb == 0:
            tensors.append(torch.empty(shape, dtype=dt))
            continue
        if off % ALIGN or off + nb > plen:
            raise TransportError(
                f"tensor {i} ({dt}{list(shape)}) at offset {off} overruns payload of {plen} bytes")
        if addr is None:
            addr = arr.ctypes.data
        if (addr + pstart + off) % itemsize:  # copy to an aligned buffer first
            v = np.ndarray(shape, _NP[code], arr[pstart + off: pstart + off + nb].copy())
        else:
            v = np.ndarray(shape, _NP[code], arr, pstart + off)
        t = torch.from_numpy(v)
        tensors.append(t if dt is not torch.bfloat16 else t.view(dt))
    if p != end:
        raise TransportError(f"tensor table has {end - p} trailing bytes")
    return tag, header, tensors
