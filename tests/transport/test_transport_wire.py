"""Wire format: pack/unpack round trips and validation of corrupted frames."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from amoe_transport import TransportError
from amoe_transport.wire import ALIGN, ENTRY, MAGIC, PREFIX, PREFIX_SIZE, VERSION, pack, unpack


def test_roundtrip_zero_copy_views():
    x = torch.randn(4, 8)
    y = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    z = torch.randn(3).to(torch.bfloat16)
    frame = pack(9, {"layer": 3, "ids": [1, 2]}, [x, y, z])
    assert frame.dtype == np.uint8 and frame.ndim == 1
    tag, header, (x2, y2, z2) = unpack(frame)
    assert tag == 9 and header == {"layer": 3, "ids": [1, 2]}
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(z.view(torch.int16), z2.view(torch.int16))
    # zero-copy: the tensors alias the frame's memory
    base = frame.ctypes.data
    for t in (x2, y2, z2):
        assert base <= t.data_ptr() < base + frame.nbytes
        assert (t.data_ptr() - base) % ALIGN == 0


def test_roundtrip_from_bytearray_and_empty_frame():
    frame = pack(0, {}, [])
    assert frame.nbytes % ALIGN == 0
    tag, header, ts = unpack(bytearray(frame.tobytes()))
    assert (tag, header, ts) == (0, {}, [])
    frame = pack(1, {"a": None}, [torch.zeros(0, 4), torch.ones(0, dtype=torch.bool)])
    tag, header, ts = unpack(bytearray(frame.tobytes()))
    assert [t.shape for t in ts] == [(0, 4), (0,)]
    assert [t.dtype for t in ts] == [torch.float32, torch.bool]


def test_misaligned_buffer_is_cloned():
    frame = pack(2, {}, [torch.arange(5, dtype=torch.int64)])
    raw = np.zeros(frame.nbytes + 1, dtype=np.uint8)
    raw[1:] = frame
    tag, _, (t,) = unpack(raw[1:])
    assert torch.equal(t, torch.arange(5))
    assert t.data_ptr() % 8 == 0


def _frame():
    return pack(4, {"k": "v"}, [torch.arange(10, dtype=torch.int32)]).copy()


def test_bad_magic():
    f = _frame()
    f[0] ^= 0xFF
    with pytest.raises(TransportError, match="magic"):
        unpack(f)


def test_bad_version():
    f = _frame()
    struct.pack_into("<H", f, 4, 99)
    with pytest.raises(TransportError, match="version"):
        unpack(f)


def test_truncated_and_short():
    f = _frame()
    for cut in (0, 5, PREFIX_SIZE - 1, PREFIX_SIZE + 3, f.nbytes - 1):
        with pytest.raises(TransportError):
            unpack(f[:cut].copy())
    with pytest.raises(TransportError, match="length"):
        unpack(np.concatenate([f, np.zeros(8, np.uint8)]))


def test_header_len_overrun():
    f = _frame()
    magic, ver, flags, tag, hlen, ntens, tlen, plen = PREFIX.unpack_from(f, 0)
    PREFIX.pack_into(f, 0, magic, ver, flags, tag, 1 << 30, ntens, tlen, plen)
    with pytest.raises(TransportError):
        unpack(f)


def _frame_with_table(entries, header=b"", payload=b"", ntens=None):
    """A frame whose tensor table is built by hand: entries are (code, ndim, offset, dims)."""
    table = b"".join(ENTRY.pack(c, nd, off) + struct.pack(f"<{len(dims)}q", *dims)
                     for c, nd, off, dims in entries)
    pstart = -(-(PREFIX_SIZE + len(table) + len(header)) // ALIGN) * ALIGN
    buf = np.zeros(pstart + len(payload), np.uint8)
    PREFIX.pack_into(buf, 0, MAGIC, VERSION, 0, 0, len(header), len(entries) if ntens is None else ntens,
                     len(table), len(payload))
    buf[PREFIX_SIZE:PREFIX_SIZE + len(table)] = np.frombuffer(table, np.uint8)
    buf[PREFIX_SIZE + len(table):PREFIX_SIZE + len(table) + len(header)] = np.frombuffer(header, np.uint8)
    buf[pstart:] = np.frombuffer(payload, np.uint8)
    return buf


def test_hand_built_table_reads_back():
    ts = unpack(_frame_with_table([(5, 1, 0, [4])], payload=bytes(16)))[2]
    assert ts[0].dtype == torch.int32 and ts[0].shape == (4,)


@pytest.mark.parametrize("entries,ntens,header", [
    ([(99, 1, 0, [1])], None, b""),             # unknown dtype code
    ([(5, 1, 0, [-1])], None, b""),             # negative dim
    ([(5, 1, 0, [100])], None, b""),            # overruns the payload
    ([(5, 1, 8, [1])], None, b""),              # misaligned offset
    ([(5, 3, 0, [1])], None, b""),              # ndim larger than the dims given
    ([(5, 1, 0, [1])], 2, b""),                 # more tensors than the table holds
    ([(5, 1, 0, [1])], 0, b""),                 # table bytes for zero tensors
    ([], 0, b"[1, 2]"),                         # header is not an object
])
def test_bad_header_structures(entries, ntens, header):
    with pytest.raises(TransportError):
        unpack(_frame_with_table(entries, header=header, payload=bytes(16), ntens=ntens))


def test_header_not_json():
    f = _frame()
    _, _, _, _, hlen, _, tlen, _ = PREFIX.unpack_from(f, 0)
    f[PREFIX_SIZE + tlen] = ord("}")
    with pytest.raises(TransportError, match="JSON"):
        unpack(f)


def test_pack_rejects_bad_input():
    with pytest.raises(TransportError):
        pack(0, ["not", "a", "dict"])
    with pytest.raises(TransportError):
        pack(0, {"t": torch.zeros(1)})
    with pytest.raises(TransportError):
        pack(0, {}, [np.zeros(3)])
    with pytest.raises(TransportError):
        pack(-1, {})
