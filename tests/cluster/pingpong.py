"""MPI ping-pong between rank 0 and rank 1: one-way latency (half the round trip, median) and
bandwidth (bytes / half round trip, best of the reps) per message size, with plain mpi4py
(Send/Recv of a byte buffer) and through the data plane's transport (transport/mpi.py:
MPITransport.isend of a float32 tensor, received by poll(): frame packing, Improbe/Mrecv,
unpacking, as every rank does). Rank 0 prints one JSON line per row.

    srun --mpi=pmi2 -N 2 --ntasks-per-node=1 python -m tests.cluster.pingpong --label veth
    srun --mpi=pmi2 -N 1 -n 2 python -m tests.cluster.pingpong --label shm

See docs/MULTINODE.md for the environment each row of the table was measured with.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

SIZES = [8, 1024, 16 << 10, 256 << 10, 1 << 20, 4 << 20]


def reps_for(n: int) -> int:
    return 400 if n <= 16 << 10 else 60 if n <= 1 << 20 else 20


def raw(comm, size: int, reps: int) -> list[float]:
    import numpy as np
    buf = np.zeros(max(size, 1), dtype=np.uint8)
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    out = []
    for i in range(reps + 5):
        comm.Barrier()
        t0 = time.perf_counter()
        if rank == 0:
            comm.Send(buf, dest=peer, tag=1)
            comm.Recv(buf, source=peer, tag=1)
        else:
            comm.Recv(buf, source=peer, tag=1)
            comm.Send(buf, dest=peer, tag=1)
        if i >= 5:
            out.append((time.perf_counter() - t0) / 2)
    return out


def via_transport(t, size: int, reps: int) -> list[float]:
    import torch
    x = torch.zeros(max(size // 4, 1), dtype=torch.float32)
    peer = 1 - t.rank
    out = []

    def recv_one():
        while True:
            msgs = t.poll(1)
            if msgs:
                return msgs[0]

    for i in range(reps + 5):
        t.comm.Barrier()
        t0 = time.perf_counter()
        if t.rank == 0:
            t.isend(peer, 7, {"i": i}, [x])
            recv_one()
        else:
            m = recv_one()
            t.isend(peer, 7, {"i": i}, m.tensors)
        if i >= 5:
            out.append((time.perf_counter() - t0) / 2)
    t.flush()  # the last reply's send (its progress is the peer's next poll otherwise)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="")
    ap.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    ap.add_argument("--apis", nargs="*", default=["mpi4py", "MPITransport"])
    a = ap.parse_args()
    from transport.mpi import MPITransport, mpi_world
    comm = mpi_world(2)
    hosts = comm.allgather(socket.gethostname())
    t = MPITransport(comm)
    for kind, fn, arg in (("mpi4py", raw, comm), ("MPITransport", via_transport, t)):
        if kind not in a.apis:
            continue
        for n in a.sizes:
            lat = fn(arg, n, reps_for(n))
            if comm.Get_rank() == 0:
                print(json.dumps({"label": a.label, "hosts": hosts, "api": kind, "bytes": n,
                                  "latency_us_median": round(statistics.median(lat) * 1e6, 1),
                                  "bandwidth_MBps_best": round(n / min(lat) / 1e6, 1)}), flush=True)
    t.close()


if __name__ == "__main__":
    main()
