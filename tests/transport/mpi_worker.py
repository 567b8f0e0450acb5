"""Worker for the multi-rank MPI transport tests.

Run as:  mpiexec -n N python tests/transport/mpi_worker.py <scenario> [...]
Every rank prints ``OK <scenario> rank <r>`` on success and exits non-zero
(with a traceback) on failure.  ``bench`` prints latency/bandwidth numbers
between ranks 0 and 1 (not used by the tests).
"""

from __future__ import annotations

import sys
import time
import traceback

import torch

from amoe_transport import Message, TransportError
from amoe_transport.mpi import MPITransport, mpi_world

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


def sample(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def collect(t: MPITransport, n: int, timeout: float = 30.0) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError(f"rank {t.rank}: got {len(out)} of {n} messages")
        out += t.wait(left)
    return out


def payload(src, dst, k):
    """Deterministic message k from src to dst."""
    ts = []
    for i, dt in enumerate(DTYPES):
        seed = (src * 1000 + dst * 100 + k) * 16 + i
        ts += [sample(dt, (3, 5), seed), sample(dt, (0, 5), seed), sample(dt, (), seed)]
    # bf16 special values (NaN payloads, inf, -0, subnormal) must survive bitwise
    bits = torch.tensor([0x7FC1, 0xFF80, 0x7F80, 0x8000, 0x0001, 0x3F80, src, dst],
                        dtype=torch.int32).to(torch.int16)
    ts.append(bits.view(torch.bfloat16))
    # a large non-contiguous tensor (rendezvous protocol, > eager limit)
    ts.append(sample(torch.bfloat16, (512, 2048), seed=src * 7 + dst)[:, ::2])
    return ts


def scen_dtypes(t):
    for dst in range(t.size):
        if dst != t.rank:
            ts = payload(t.rank, dst, 0)
            t.isend(dst, 5, {"k": 0, "n": len(ts)}, ts)
            for x in ts:          # mutating after isend must not matter
                x.zero_()
    msgs = collect(t, t.size - 1)
    assert sorted(m.src for m in msgs) == [r for r in range(t.size) if r != t.rank]
    for m in msgs:
        exp = payload(m.src, t.rank, 0)
        assert m.tag == 5 and m.header == {"k": 0, "n": len(exp)}, m.header
        assert len(m.tensors) == len(exp)
        for i, (a, b) in enumerate(zip(exp, m.tensors)):
            assert same_bits(a, b), (m.src, i, a.dtype, a.shape, b.shape)


def a2a_rows(src, dst, rnd):
    return (src * 7 + dst * 3 + rnd * 5) % 6   # 0..5 rows, uneven


def scen_a2a(t):
    """Several unsynchronised all-to-all-v rounds (uneven, empty, self)."""
    rounds = 6
    msgs: list[Message] = []
    for rnd in range(rounds):
        per_dst = {}
        for d in range(t.size):
            rows = a2a_rows(t.rank, d, rnd)
            if (t.rank + d + rnd) % 4 == 0:
                per_dst[d] = ({"r": rnd, "rows": rows, "empty": True}, [])
            else:
                per_dst[d] = ({"r": rnd, "rows": rows},
                              [torch.full((rows, 64), t.rank * 100 + d, dtype=torch.bfloat16),
                               torch.arange(rows, dtype=torch.int32) + rnd])
        t.alltoallv(2, per_dst)
        msgs += t.poll()
    msgs += collect(t, rounds * t.size - len(msgs))
    seen: dict = {}
    for m in msgs:
        r = m.header["r"]
        assert seen.get(m.src, -1) == r - 1, ("round order", m.src, seen.get(m.src), r)
        seen[m.src] = r
        rows = a2a_rows(m.src, t.rank, r)
        assert m.tag == 2 and m.header["rows"] == rows
        if m.header.get("empty"):
            assert m.tensors == []
        else:
            assert torch.equal(m.tensors[0], torch.full((rows, 64), m.src * 100 + t.rank,
                                                        dtype=torch.bfloat16))
            assert torch.equal(m.tensors[1], torch.arange(rows, dtype=torch.int32) + r)
    assert seen == {r: rounds - 1 for r in range(t.size)}, seen


def scen_many(t):
    n = 400
    big_tag = t.tag_ub + 10          # above MPI's TAG_UB: must still work
    tags = [0, 1, 3, big_tag]
    for i in range(n):
        for d in range(t.size):
            if d != t.rank:
                t.isend(d, tags[i % 4], {"i": i}, [torch.tensor([i, t.rank, d])])
        if i % 50 == 0:
            t.poll(0)                # progress sends only
    msgs = collect(t, n * (t.size - 1))
    last: dict = {}
    for m in msgs:
        i = m.header["i"]
        assert m.tag == tags[i % 4], (m.tag, i)
        assert m.tensors[0].tolist() == [i, m.src, t.rank]
        key = (m.src, m.tag)
        assert last.get(key, -1) < i, ("out of order", key, last.get(key), i)
        last[key] = i
    assert len(last) == (t.size - 1) * 4
    t.flush(10)


def scen_idle(t):
    """Rank 0 stays silent for 0.6 s; the others wait() and must not spin."""
    if t.rank == 0:
        time.sleep(0.6)
        for d in range(1, t.size):
            t.isend(d, 1, {"wake": True})
        t.flush(10)
    else:
        c0, w0 = time.process_time(), time.monotonic()
        msgs = t.wait(10.0)
        cpu, wall = time.process_time() - c0, time.monotonic() - w0
        assert msgs and msgs[0].header == {"wake": True}
        print(f"idle-wait rank {t.rank}: wall {wall:.3f}s cpu {cpu:.3f}s", flush=True)
        assert wall > 0.3, wall
        assert cpu < 0.25 * wall, f"idle wait burned CPU: {cpu:.3f}s of {wall:.3f}s"


def scen_bell(t):
    """Ranks on one node ring each other: a rank asleep in wait() is woken by the bell."""
    assert t._bell is not None and t._bell.covers(t.size), "every rank of a one-node job is rung"
    if t.rank == 0:
        time.sleep(0.3)
        t.isend(1, 1, {"ring": True})
        assert t._bell.rung == 1
    elif t.rank == 1:
        msgs = t.wait(10.0)
        assert msgs and msgs[0].header == {"ring": True}
        # The bell either woke the wait or, if the poll won the race, is still pending now.
        t._bell.sleep(0.5)
        assert t._bell.woken >= 1


def scen_bench(t):
    assert t.size == 2, "bench runs with exactly 2 ranks"
    peer = 1 - t.rank
    small = [torch.zeros(16, dtype=torch.bfloat16)]
    iters = 2000
    for phase in ("warm", "run"):
        n = 50 if phase == "warm" else iters
        t0 = time.perf_counter()
        for _ in range(n):
            if t.rank == 0:
                t.isend(peer, 0, {"p": 1}, small)
                collect(t, 1)
            else:
                collect(t, 1)
                t.isend(peer, 0, {"p": 1}, small)
        dt = time.perf_counter() - t0
    if t.rank == 0:
        print(f"bench small round trip: {dt / iters * 1e6:.1f} us", flush=True)
    for mb in (4, 64):
        big = torch.randn(mb * (1 << 20) // 4)
        reps = 20 if mb == 4 else 5
        t.comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if t.rank == 0:
                t.isend(peer, 1, {}, [big])
                t.flush(30)
            else:
                collect(t, 1)
        if t.rank == 1:
            t.isend(peer, 2, {})       # ack
        else:
            collect(t, 1)
        dt = time.perf_counter() - t0
        if t.rank == 0:
            print(f"bench {mb} MB one-way: {dt / reps * 1e3:.2f} ms/msg, "
                  f"{mb * reps / dt / 1024:.2f} GB/s", flush=True)


SCENARIOS = {"dtypes": scen_dtypes, "a2a": scen_a2a, "many": scen_many,
             "idle": scen_idle, "bell": scen_bell, "bench": scen_bench}


def main(argv):
    comm = mpi_world(expected_size=int(argv[2]) if len(argv) > 2 else None)
    t = MPITransport(comm)
    name = argv[1]
    try:
        SCENARIOS[name](t)
        t.flush(30)
        comm.Barrier()
        leftovers = t.poll()
        assert not leftovers, f"unexpected extra messages: {leftovers[:3]}"
        t.close()
        print(f"OK {name} rank {comm.Get_rank()}", flush=True)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        comm.Abort(1)


if __name__ == "__main__":
    main(sys.argv)
