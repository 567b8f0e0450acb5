"""In-process backend: the reference semantics for every transport."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from amoe_transport import InProcHub, Message, Transport, TransportError, make_transport

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]


def sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape,
                         generator=g).to(dtype)


def bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8) if a.numel() else a,
        b.contiguous().reshape(-1).view(torch.uint8) if b.numel() else b)


def drain(t: Transport, n: int, timeout=5.0) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only got {len(out)} of {n} messages"
        out += t.wait(left)
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_roundtrip_every_dtype(dtype):
    hub = InProcHub(2)
    a, b = hub.transport(0), hub.transport(1)
    ts = [sample(dtype, (5, 7)), sample(dtype, (0, 3)), sample(dtype, ()),
          sample(dtype, (2, 3, 4))[:, ::2], sample(dtype, (0,))]
    a.isend(1, 3, {"layer": 2, "x": [1.5, None, True, "s"], "d": {"k": 1}}, ts)
    (m,) = drain(b, 1)
    assert (m.src, m.tag) == (0, 3)
    assert m.header == {"layer": 2, "x": [1.5, None, True, "s"], "d": {"k": 1}}
    assert len(m.tensors) == len(ts)
    for x, y in zip(ts, m.tensors):
        assert bitwise_equal(x, y), (x, y)


def test_bf16_special_values_bitwise():
    hub = InProcHub(2)
    a, b = hub.transport(0), hub.transport(1)
    bits = torch.tensor([0x7FC1, 0xFF80, 0x7F80, 0x8000, 0x0001, 0x3F80], dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    a.isend(1, 0, {}, [x])
    (m,) = drain(b, 1)
    assert torch.equal(m.tensors[0].view(torch.int16), bits)


def test_sender_may_mutate_after_isend():
    hub = InProcHub(2)
    a, b = hub.transport(0), hub.transport(1)
    x = torch.arange(10, dtype=torch.float32)
    a.isend(1, 0, {}, [x])
    x.fill_(-1)
    del x
    (m,) = drain(b, 1)
    assert torch.equal(m.tensors[0], torch.arange(10, dtype=torch.float32))


def test_empty_message_and_no_tensors():
    hub = InProcHub(1)
    t = hub.transport(0)
    t.isend(0, 0, {})
    (m,) = drain(t, 1)
    assert m.header == {} and m.tensors == [] and m.src == 0


def test_ordering_per_src_and_tag_threads():
    n_ranks, n_msgs = 4, 200
    hub = InProcHub(n_ranks)
    errors = []

    def sender(r):
        try:
            t = hub.transport(r)
            for i in range(n_msgs):
                tag = i % 3
                t.isend(0, tag, {"i": i}, [torch.full((i % 5,), i, dtype=torch.int32)])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ths = [threading.Thread(target=sender, args=(r,)) for r in range(1, n_ranks)]
    for th in ths:
        th.start()
    got = drain(hub.transport(0), (n_ranks - 1) * n_msgs)
    for th in ths:
        th.join()
    assert not errors
    last: dict = {}
    for m in got:
        i = m.header["i"]
        assert m.tag == i % 3
        assert torch.equal(m.tensors[0], torch.full((i % 5,), i, dtype=torch.int32))
        key = (m.src, m.tag)
        assert last.get(key, -1) < i
        last[key] = i
    assert len(last) == (n_ranks - 1) * 3


def test_alltoallv_with_empties_threads():
    n = 4
    hub = InProcHub(n)
    results: dict[int, list[Message]] = {}

    def rank_main(r):
        t = hub.transport(r)
        per_dst = {}
        for d in range(n):
            rows = (r * 3 + d) % 4  # some zero
            tens = [torch.full((rows, 2), r * 10 + d, dtype=torch.bfloat16),
                    torch.arange(rows, dtype=torch.int64)] if (r + d) % 3 else []
            per_dst[d] = ({"from": r, "rows": rows}, tens)
        t.alltoallv(7, per_dst)
        t.flush(1.0)
        results[r] = drain(t, n)

    ths = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(10)
    for d in range(n):
        msgs = sorted(results[d], key=lambda m: m.src)
        assert [m.src for m in msgs] == list(range(n))
        for m in msgs:
            r = m.src
            assert m.tag == 7 and m.header["from"] == r
            rows = (r * 3 + d) % 4
            if (r + d) % 3:
                assert m.tensors[0].shape == (rows, 2)
                assert torch.equal(m.tensors[0], torch.full((rows, 2), r * 10 + d,
                                                            dtype=torch.bfloat16))
                assert torch.equal(m.tensors[1], torch.arange(rows))
            else:
                assert m.tensors == []


def test_poll_max_messages():
    hub = InProcHub(2)
    a, b = hub.transport(0), hub.transport(1)
    for i in range(5):
        a.isend(1, 0, {"i": i})
    assert b.poll(0) == []
    got = b.poll(2)
    assert [m.header["i"] for m in got] == [0, 1]
    got = b.poll(None)
    assert [m.header["i"] for m in got] == [2, 3, 4]
    assert b.poll() == []


def test_wait_timeout_returns_empty():
    t = InProcHub(2).transport(0)
    t0 = time.monotonic()
    assert t.wait(0.2) == []
    dt = time.monotonic() - t0
    assert 0.19 <= dt < 0.5, dt
    assert t.wait(0) == []


def test_wait_does_not_burn_cpu():
    t = InProcHub(2).transport(0)
    c0, w0 = time.process_time(), time.monotonic()
    assert t.wait(0.3) == []
    cpu, wall = time.process_time() - c0, time.monotonic() - w0
    assert wall >= 0.29
    assert cpu < 0.1, f"idle wait used {cpu:.3f}s CPU over {wall:.3f}s"


def test_wait_wakes_up_on_message():
    hub = InProcHub(2)
    a, b = hub.transport(0), hub.transport(1)
    threading.Timer(0.05, lambda: a.isend(1, 1, {"x": 1})).start()
    t0 = time.monotonic()
    msgs = b.wait(5.0)
    assert time.monotonic() - t0 < 1.0
    assert msgs[0].header == {"x": 1}


def test_errors():
    hub = InProcHub(2)
    t = hub.transport(0)
    with pytest.raises(TransportError):
        t.isend(2, 0, {})
    with pytest.raises(TransportError):
        t.isend(-1, 0, {})
    with pytest.raises(TransportError):
        t.isend(1, -1, {})
    with pytest.raises(TransportError):
        t.isend(1, 0, {"x": object()})
    with pytest.raises(TransportError):
        t.isend(1, 0, {}, [torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(TransportError):
        t.alltoallv(0, {0: ({}, []), 5: ({}, [])})
    assert t.pending_sends() == 0
    t.flush(0.1)
    t.close()
    t.close()
    with pytest.raises(TransportError):
        t.isend(1, 0, {})
    with pytest.raises(TransportError):
        InProcHub(0)


def test_make_transport_inproc_and_unknown():
    t = make_transport("inproc")
    assert (t.rank, t.size) == (0, 1)
    t2 = InProcHub(3).transport(2)
    assert make_transport("inproc", comm=t2) is t2
    with pytest.raises(TransportError):
        make_transport("carrier-pigeon")


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_import_does_not_initialise_mpi():
    import subprocess
    import sys
    code = ("import sys, amoe_transport; "
            "assert 'mpi4py.MPI' not in sys.modules, 'MPI imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
