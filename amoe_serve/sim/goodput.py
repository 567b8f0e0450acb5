"""Goodput at a TPOT SLO, the simulator's headline: per cluster size and system, every
configuration is swept (AEP: attention:expert split, replicas, waves, policy, running-request
limit; lockstep: replicas and its batch limit) and the best tokens/s per GPU among the points
whose ITL p50 <= SLO and TTFT p99 <= bound is the goodput; the best over all points is the
saturation column. The verdict per point is the bench's (`amoe_serve.slo.meets_slo`).

Offline backlog (the running-request limit is the load knob): TTFT counts from a request's
admission (its wait in the backlog is the benchmark's artefact, not the system's); Poisson
arrivals (a rate sweep): from arrival, as the bench does.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

from amoe_serve.slo import meets_slo

from .sim_config import SimConfig
from .point import _table, run_one


@dataclass
class Candidate:
    """One structural configuration; its limit sweep runs in order and stops past the SLOs."""
    system: str
    policy: str = "defrag"
    attention_fraction: float | None = None
    replicas: int = 0
    waves: int | None = None
    max_wait_ms: float | None = None
    limits: list[int] = field(default_factory=list)
    expert_min_rows: int | None = None

    def describe(self) -> dict:
        return {"policy": self.policy, "attention_fraction": self.attention_fraction,
                "replicas": self.replicas, "waves": self.waves, "expert_min_rows": self.expert_min_rows}


def point_verdicts(rec: dict, slos: list[float], ttft_ms: float) -> dict:
    ttft = rec["ttft_admitted_ms_p99"] if rec["arrival"] == "offline" else rec["ttft_ms_p99"]
    view = {"itl_ms_p50": _num(rec["itl_ms_p50"]), "ttft_ms_p99": _num(ttft)}
    return {str(s): meets_slo(view, s, ttft_ms) for s in slos}


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def candidates(cfg: SimConfig) -> list[Candidate]:
    r = cfg.run
    out = []
    if "lockstep" in r.systems:
        for rep in r.replicas:
            out.append(Candidate("lockstep", "lockstep", replicas=rep, limits=list(r.lockstep_max_running)))
    if "aep" in r.systems:
        fracs = r.aep_attention_fractions or [cfg.cluster.attention_fraction]
        for pol, frac, rep, wv, gate in itertools.product(r.policies, fracs, r.replicas, r.aep_waves or [r.attention_waves],
                                                          r.aep_expert_min_rows or [r.expert_min_rows]):
            out.append(Candidate("aep", pol, frac, rep, wv, limits=list(r.aep_max_running or [r.max_running_requests]),
                                 expert_min_rows=gate))
    return out


def sweep(cfg: SimConfig, gpus: int, cands: list[Candidate], log=print) -> list[dict]:
    """Every candidate's limit sweep at one size; points past 2x the largest SLO end the sweep
    (a larger limit only raises ITL)."""
    slos, bound = list(cfg.goodput.tpot_slo_ms), cfg.goodput.ttft_p99_ms
    table = _table(cfg)
    points = []
    for c in cands:
        for mr in sorted(c.limits):
            try:
                rec = run_one(cfg, c.system, gpus, policy=c.policy, max_running=mr, table=table, waves=c.waves,
                              attention_fraction=c.attention_fraction, replicas=c.replicas,
                              max_wait_ms=c.max_wait_ms, expert_min_rows=c.expert_min_rows)
            except ValueError as e:   # a split the model cannot be placed on
                log(f"{gpus:3d} GPUs {c.system} {c.describe()}: skipped ({e})")
                break
            rec["meets_slo"] = point_verdicts(rec, slos, bound)
            points.append(rec)
            log(_line(rec))
            itl = rec["itl_ms_p50"]
            if itl is None or math.isnan(itl) or itl > 2 * max(slos):
                break
    return points


def headline(points: list[dict], slos: list[float], ttft_ms: float) -> list[dict]:
    """One record per (gpus, system, SLO): goodput and saturation per GPU, and where."""
    out = []
    for g, system in sorted({(p["gpus"], p["system"]) for p in points}):
        mine = [p for p in points if p["gpus"] == g and p["system"] == system]
        sat = max(mine, key=lambda p: p["tokens_per_s_per_gpu"])
        for s in slos:
            ok = [p for p in mine if p["meets_slo"][str(s)]]
            best = max(ok, key=lambda p: p["tokens_per_s_per_gpu"]) if ok else None
            out.append({
                "gpus": g, "system": system, "model": mine[0]["model"], "tpot_slo_ms": s, "ttft_p99_bound_ms": ttft_ms,
                "goodput_tok_s_per_gpu": best["tokens_per_s_per_gpu"] if best else 0.0,
                "saturation_tok_s_per_gpu": sat["tokens_per_s_per_gpu"],
                "best": _where(best) if best else None, "saturation_at": _where(sat),
                "itl_ms_p50": best["itl_ms_p50"] if best else None,
                "ttft_ms_p99": (best["ttft_admitted_ms_p99"] if best["arrival"] == "offline" else best["ttft_ms_p99"])
                if best else None,
                "points": len(mine)})
    return out


def _where(p: dict) -> dict:
    return {"split": f"{p['attention_gpus']}+{p['expert_gpus']}" if p["system"] == "aep" or p["layout"] == "split"
            else f"{p['gpus']} colocated", "replicas": p["replicas"], "waves": p["attention_waves"],
            "expert_min_rows": p.get("expert_min_rows"),
            "limit": p["max_running_requests"], "policy": p["policy"], "placement": p["placement"],
            "itl_ms_p50": p["itl_ms_p50"], "tokens_per_s_per_gpu": p["tokens_per_s_per_gpu"]}


def ratios(head: list[dict]) -> dict:
    by = {(h["gpus"], h["system"], h["tpot_slo_ms"]): h for h in head}
    out: dict = {"aep_over_lockstep": {}, "aep_scaling": {}}
    for (g, s, slo), h in by.items():
        if s == "aep" and (g, "lockstep", slo) in by:
            lk = by[(g, "lockstep", slo)]["goodput_tok_s_per_gpu"]
            out["aep_over_lockstep"][f"{g}@{slo:g}ms"] = h["goodput_tok_s_per_gpu"] / lk if lk else None
    for slo in sorted({k[2] for k in by}):
        pts = sorted((g, h["goodput_tok_s_per_gpu"] * g) for (g, s, sl), h in by.items() if s == "aep" and sl == slo)
        if len(pts) > 1 and pts[0][1]:
            out["aep_scaling"][f"{pts[0][0]}->{pts[-1][0]}@{slo:g}ms"] = pts[-1][1] / pts[0][1]
    return out


def _line(rec: dict) -> str:
    ok = "".join("+" if v else "-" for v in rec["meets_slo"].values())
    return (f"{rec['gpus']:3d} GPUs {rec['system']:8s} {rec['attention_gpus']}+{rec['expert_gpus']} "
            f"rep={rec['replicas']} waves={rec['attention_waves']} {rec['policy']:8s} "
            f"limit={rec['max_running_requests']:5d}: {rec['tokens_per_s_per_gpu']:8.0f} tok/s/GPU  "
            f"itl p50 {rec['itl_ms_p50']:7.1f} ms  ttft p99 {rec['ttft_admitted_ms_p99']:7.0f} ms  "
            f"slo {ok}  idle {rec['idle_fraction']:.2f}  ({rec['wall_s']:.1f}s)")


def with_overrides(cfg: SimConfig, **sections) -> SimConfig:
    """A copy of cfg with some fields replaced, e.g. run={"placement": "replicate"}."""
    c = copy.deepcopy(cfg)
    for sec, kv in sections.items():
        for k, v in kv.items():
            setattr(getattr(c, sec), k, v)
    return c
