"""Entry point of every process of an MPI data-plane job: `python -m amoe_serve.engine.rank_main`.

Rank 0 runs the gateway of a batch `generate` job (or, with --serve, the serving gateway); the
others run attention or expert ranks. A rank that raises prints why and aborts the whole job,
so nothing hangs. A serving job drains on SIGTERM (see engine/serve_gateway.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from amoe_serve.config import from_yaml
from amoe_serve.engine.batch_job import gateway_generate
from amoe_serve.engine.job import pick_device, print_fatal, report_fatal, run_worker, topology
from amoe_serve.engine.serve_gateway import gateway_serve
from amoe_serve.procs import bind_to_core, precise_sleeps
from amoe_transport import TransportError, make_transport
from amoe_transport.mpi import mpi_world


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amoe_serve.engine.rank_main")
    ap.add_argument("--config", required=True)
    ap.add_argument("--input")
    ap.add_argument("--output")
    ap.add_argument("--stats")
    ap.add_argument("--serve", action="store_true", help="rank 0 serves the ingress link instead of a batch")
    ap.add_argument("--address-file", help="with --serve: where the gateway writes host:port")
    args = ap.parse_args(argv)
    cfg = from_yaml(Path(args.config).read_text())
    torch.set_num_threads(cfg.runtime.threads_per_rank)
    precise_sleeps()

    topo = topology(cfg)
    try:
        comm = mpi_world(expected_size=topo.world_size)
    except TransportError as e:
        print(f"[amoe-serve] {e}", file=sys.stderr, flush=True)
        return 2
    from mpi4py import MPI  # only after mpi_world has set mpi4py's options and initialised MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank()
    if cfg.runtime.cpu_bind == "core":  # every rank reads the same config: all join the collective
        compute_here = node.allgather(topo.role(comm.Get_rank()) != "gateway")  # the gateway floats
        if compute_here[local_rank] and bind_to_core(sum(compute_here[:local_rank])) is None:
            print(f"[amoe-serve] rank {comm.Get_rank()}: runtime.cpu_bind=core: could not pin to a core; "
                  "running unpinned", file=sys.stderr, flush=True)
    device = pick_device(cfg, local_rank)
    # NCCL between GPU ranks, MPI between CPU ranks; every rank must pick the same kind.
    kind = cfg.runtime.transport
    if kind == "auto":
        kind = "nccl" if device.startswith("cuda") else "mpi"
    transport = make_transport(kind, comm, device)
    if args.serve and transport.rank != 0:
        # A serving job drains on SIGTERM (mpiexec forwards it to every rank): the gateway stops
        # admitting, lets in-flight requests finish, then sends SHUTDOWN; until then the workers
        # must keep computing. A rank that must die anyway gets SIGKILL (kill_group).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if transport.rank == 0 and args.serve:
            gateway_serve(cfg, transport, args.address_file)
        elif transport.rank == 0:
            gateway_generate(cfg, transport, args.input, args.output, args.stats)
        else:
            run_worker(cfg, transport, device)
    except BaseException as e:
        print_fatal(report_fatal(transport, topo, e) if transport.rank else f"[amoe-serve] gateway failed: {e}")
        comm.Abort(1)
        return 1
    transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
