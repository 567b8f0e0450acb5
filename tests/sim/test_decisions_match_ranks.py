"""One decision code: the real in-process ranks and the simulator, on the same tiny deployment,
routing draws and requests, execute the same sequence of (rank, block, slot, rows) on every rank.

One attention rank, one wave and a max_wait longer than the run keep the attention rank's order
independent of thread timing. An expert rank runs whatever has landed when it polls, so two
dispatches sent back to back (the batch limit splits the prompts) would merge or not by
chance: the real run sends a dispatch to an expert rank once that rank has answered the
previous one (an expert that keeps up, as the simulator's does with its cost table), and then
the per-rank sequences must be identical."""
import json
import threading
import time

import numpy as np
import pytest

from amoe_serve.config import load_config
from amoe_serve.counters import RankCounters
from amoe_serve.engine.job import make_gateway, placement, run_worker, topology
from amoe_serve.engine.skew import ExponentialSkew
from amoe_serve.engine.tags import Tag
from amoe_serve.model import load_spec
from amoe_serve.requests_io import GenerateRequest
from amoe_serve.sampler import SamplingParams
from amoe_serve.sim.aep import AepSim
from amoe_serve.sim.sim_config import SimModelConfig
from amoe_serve.sim.cost import CostModel, DeviceTable
from amoe_serve.sim.params import SimParams
from amoe_serve.sim.workload import Workload
from amoe_transport import InProcHub

PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [200, 3, 150, 99, 1, 250, 31, 77, 64, 2, 18, 101],
           [33, 44, 55, 66, 77], [9] * 9, [4, 4]]
MAX_TOKENS = [6, 3, 5, 7, 2, 4]
TIMEOUT_S = 60


class _SkewCounts:
    """The real attention rank's router (same seed and stream) as the simulator's rows-per-expert."""

    def __init__(self, skew: ExponentialSkew, num_experts: int) -> None:
        self.skew, self.E = skew, num_experts

    def counts(self, b: int, tokens: int) -> np.ndarray:
        import torch
        ids, _ = self.skew.route(b, tokens, torch.float32, "cpu")
        return np.bincount(ids.reshape(-1).numpy(), minlength=self.E)


def _real(cfg, spec, monkeypatch) -> dict[int, list]:
    seen: dict[int, list] = {}
    orig = RankCounters.record_batch

    def record(self, b, s, n):
        seen.setdefault(int(threading.current_thread().name[4:]), []).append((int(b), int(s), int(n)))
        orig(self, b, s, n)

    def record_many(self, b, slots, rows):  # an expert rank's grouped step: its queues in order
        for s, n in zip(slots, rows):
            record(self, b, s, n)

    monkeypatch.setattr(RankCounters, "record_batch", record)
    monkeypatch.setattr(RankCounters, "record_batches", record_many)
    topo = topology(cfg)
    hub = InProcHub(topo.world_size)
    gw = make_gateway(cfg, hub.transport(0), spec)
    # Every request is queued before the ranks start, so the first poll admits them all.
    for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        gw.submit(GenerateRequest(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True)))
    errors: list[str] = []

    dispatched: dict[int, int] = {}  # expert rank -> dispatches sent to it
    answered: dict[int, int] = {}    # expert rank -> replies it sent
    attn = hub.transport(1)
    send = attn.isend

    def paced_send(dst, tag, header, tensors=()):
        if tag == Tag.DISPATCH:
            deadline = time.monotonic() + TIMEOUT_S
            while answered.get(dst, 0) < dispatched.get(dst, 0) and time.monotonic() < deadline:
                time.sleep(1e-4)
            dispatched[dst] = dispatched.get(dst, 0) + 1
        send(dst, tag, header, tensors)

    attn.isend = paced_send
    for r in topo.experts:
        t = hub.transport(r)

        def counted_send(dst, tag, header, tensors=(), _send=t.isend, _r=r):
            _send(dst, tag, header, tensors)
            if tag == Tag.COMBINE:
                answered[_r] = answered.get(_r, 0) + 1

        t.isend = counted_send

    def worker(rank: int) -> None:
        try:
            run_worker(cfg, hub.transport(rank))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"rank {rank}: {e!r}")

    threads = [threading.Thread(target=worker, args=(r,), daemon=True, name=f"rank{r}")
               for r in range(1, topo.world_size)]
    for th in threads:
        th.start()
    try:
        gw.run([], timeout=TIMEOUT_S)
    finally:
        gw.shutdown(timeout=10)
        for th in threads:
            th.join(timeout=10)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)
    assert [len(gw.results[f"r{i}"].output_token_ids) for i in range(len(PROMPTS))] == MAX_TOKENS
    return seen


def _simulated(cfg, spec) -> dict[int, list]:
    s, r = cfg.scheduler, cfg.routing
    K = r.top_k or spec.top_k
    model = SimModelConfig(hidden=spec.hidden_size, ffn=spec.expert_intermediate_size, num_blocks=spec.num_blocks,
                           num_experts=spec.num_experts, top_k=K, num_heads=spec.num_heads,
                           num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, vocab=spec.vocab_size)
    table = DeviceTable(name="fixed", peak_flops=0, mem_bw=0, memory_bytes=1e9, step_overhead_s=0.0,
                        expert_points=[[1, 1e-3], [512, 2e-3]], attention_fit=[1e-3, 1e-5, 1e-8],
                        lm_head_fit=[1e-3, 1e-5], intra_bw=1e9, intra_lat_s=1e-4, inter_bw=1e9, inter_lat_s=1e-4)
    wl = Workload(np.zeros(len(PROMPTS)), np.array([len(p) for p in PROMPTS]), np.array(MAX_TOKENS))
    p = SimParams(num_blocks=spec.num_blocks, num_experts=spec.num_experts, top_k=K,
                  max_running=cfg.engine.max_running_requests, max_batch_tokens=cfg.engine.max_batch_tokens,
                  max_expert_batch=s.max_expert_batch, group_block=s.group_block, policy=s.policy,
                  lookahead=s.lookahead, decay=s.decay, attention_waves=s.attention_waves,
                  attention_max_wait_s=s.attention_max_wait_ms * 1e-3, min_wave_requests=s.min_wave_requests)
    A, X = cfg.deployment.attention_ranks, cfg.deployment.expert_ranks
    routers = [_SkewCounts(ExponentialSkew(spec.num_blocks, spec.num_experts, K, r.rate, r.seed, r.affinity,
                                           stream=1 + a), spec.num_experts) for a in range(A)]
    trace: list = []
    sim = AepSim(CostModel(table, model), wl, p, A, X, placement=placement(cfg, spec), routers=routers, trace=trace)
    st = sim.run()
    assert st.generated.tolist() == MAX_TOKENS
    out: dict[int, list] = {}
    for rank, b, slot, rows in trace:
        out.setdefault(rank, []).append((b, slot, rows))
    return out


@pytest.mark.parametrize("replicated", [False, True])
def test_ranks_and_simulator_execute_the_same_steps(checkpoints, tmp_path, monkeypatch, replicated):
    ckpt = checkpoints["mixtral"]
    spec = load_spec(str(ckpt))
    over = [f"model.path={ckpt}", "deployment.mode=aep", "deployment.attention_ranks=1",
            "deployment.expert_ranks=2", "routing.mode=exponential", "routing.top_k=2", "routing.rate=0.7",
            "scheduler.attention_waves=1", "scheduler.attention_max_wait_ms=600000",
            "engine.max_batch_tokens=20", "scheduler.max_expert_batch=64"]
    if replicated:  # expert 0 of every block on both ranks: its rows are cut in two
        B, E = spec.num_blocks, spec.num_experts
        rank_BE = [[0 if e < E // 2 else 1 for e in range(E)] for _ in range(B)]
        reps = [[[1] if e == 0 else [] for e in range(E)] for _ in range(B)]
        path = tmp_path / "place.json"
        path.write_text(json.dumps({"format": "amoe-placement", "version": 1, "expert_ranks": 2,
                                    "experts": rank_BE, "replicas": reps}))
        over.append(f"deployment.placement={path}")
    cfg = load_config(None, over)
    real = _real(cfg, spec, monkeypatch)
    sim = _simulated(cfg, spec)
    assert set(real) == set(sim) == {1, 2, 3}
    for rank in sorted(real):
        assert real[rank] == sim[rank], f"rank {rank} executed differently"
    # It did exercise the decisions: prompts split by the batch limit, every block, both slots.
    assert len({b for b, _, _ in real[1]}) == spec.num_blocks
    assert max(n for *_, n in real[1]) <= 20 and len(real[1]) > spec.num_blocks * max(MAX_TOKENS)
