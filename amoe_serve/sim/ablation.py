"""What each mechanism is worth at the SLO: one table at one cluster size, every row a goodput
sweep (its limit swept, everything else fixed as the row says), with and without noise.

Rows (AEP rows add one mechanism each to the row above):
  lockstep           greedy balancing / EPLB replicas swept, its batch limit swept
  μ-queues alone     AEP, one wave, no wave gate, defrag, contiguous experts, the configured split
  + micro-waves      waves swept (1, 2, 4) with the wave gate
  MTFS / FLFS        the + micro-waves row with another queue policy
  + replicas         greedy balancing / EPLB-style replicas swept (lockstep's choices, 0 included:
                     a row offers its mechanism, the sweep uses it where it pays)
  + split ratio      attention:expert fractions swept (with the row above's choices)
  no host cost       the best AEP row and lockstep with the host costs set to 0 (what they limit)
"""
from __future__ import annotations

from .sim_config import SimConfig
from .goodput import Candidate, headline, sweep, with_overrides


def ablation(cfg: SimConfig, log=print) -> list[dict]:
    g = cfg.goodput.ablation_gpus
    r = cfg.run
    slos, bound = list(cfg.goodput.tpot_slo_ms), cfg.goodput.ttft_p99_ms
    lim_a, lim_l = list(r.aep_max_running or [r.max_running_requests]), list(r.lockstep_max_running)
    waves = r.aep_waves or [r.attention_waves]
    fracs = r.aep_attention_fractions or [cfg.cluster.attention_fraction]
    # 0 (greedy balancing, no copies) stays in: replicas forced on made "+ split ratio" miss a
    # point the headline sweep finds (16 GPUs: 4+12 without replicas meets 50 ms, with them not).
    reps = sorted(set(r.replicas) | {1})
    contiguous = {"placement": "contiguous"}
    replicate = {"placement": "replicate"}
    rows = [
        ("lockstep", replicate, [Candidate("lockstep", "lockstep", replicas=x, limits=lim_l) for x in r.replicas]),
        ("μ-queues alone", contiguous, [Candidate("aep", "defrag", None, 0, 1, 0.0, lim_a)]),
        ("+ micro-waves", contiguous, [Candidate("aep", "defrag", None, 0, w, None, lim_a) for w in waves]),
        ("+ micro-waves, MTFS", contiguous, [Candidate("aep", "mtfs", None, 0, w, None, lim_a) for w in waves]),
        ("+ micro-waves, FLFS", contiguous, [Candidate("aep", "flfs", None, 0, w, None, lim_a) for w in waves]),
        ("+ replicas", replicate, [Candidate("aep", "defrag", None, x, w, None, lim_a) for x in reps for w in waves]),
        ("+ split ratio", replicate, [Candidate("aep", "defrag", f, x, w, None, lim_a)
                                     for f in fracs for x in reps for w in waves]),
    ]
    out = []
    for cv in sorted({0.0, cfg.noise.cv or 0.05}):
        for name, run_over, cands in rows:
            c = with_overrides(cfg, run=run_over, noise={"cv": cv})
            pts = sweep(c, g, cands, log)
            for h in headline(pts, slos, bound):
                out.append({"row": name, "noise_cv": cv, **h})
        # What the host costs limit: the last AEP row and lockstep with them removed.
        for name, run_over, cands in (rows[0], rows[-1]):
            c = with_overrides(cfg, run=run_over, noise={"cv": cv}, cluster={"host": "zero"})
            pts = sweep(c, g, cands, log)
            for h in headline(pts, slos, bound):
                out.append({"row": f"{name}, no host cost", "noise_cv": cv, **h})
    return out


def ablation_markdown(rows: list[dict]) -> str:
    slos = sorted({r["tpot_slo_ms"] for r in rows})
    cvs = sorted({r["noise_cv"] for r in rows})
    head = ["mechanism"] + [f"TPOT {s:g} ms, cv {cv:g}" for s in slos for cv in cvs] + ["saturation (cv 0)", "best at the first SLO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = list(dict.fromkeys(r["row"] for r in rows))
    for n in names:
        cells = [n]
        for s in slos:
            for cv in cvs:
                h = next((r for r in rows if r["row"] == n and r["tpot_slo_ms"] == s and r["noise_cv"] == cv), None)
                cells.append("-" if h is None else f"{h['goodput_tok_s_per_gpu']:.0f}")
        h0 = next(r for r in rows if r["row"] == n)
        cells.append(f"{h0['saturation_tok_s_per_gpu']:.0f}")
        b = h0["best"]
        cells.append("none" if not b else f"{b['split']} rep {b['replicas']} waves {b['waves']} limit {b['limit']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
