"""`amoe-serve sim`: run the configured cluster sizes and systems, write results and plots."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .ablation import ablation, ablation_markdown
from .sim_config import SimConfig
from .goodput import candidates, headline, ratios, sweep
from .point import _table, run_one



def run_sim(cfg: SimConfig, log=print) -> tuple[list[dict], dict]:
    """All records and a summary (best record per (gpus, system[, policy]) and the ratios)."""
    table = _table(cfg)
    r, w = cfg.run, cfg.workload
    records: list[dict] = []
    rates = w.request_rates if w.arrival == "poisson" else [None]
    for g in cfg.cluster.gpus:
        for rate in rates:
            if "aep" in r.systems:
                for pol in r.policies:
                    for mr in (r.aep_max_running or [r.max_running_requests]):
                        for wv in (r.aep_waves or [r.attention_waves]):
                            rec = run_one(cfg, "aep", g, policy=pol, max_running=mr, rate_per_gpu=rate,
                                          table=table, waves=wv)
                            records.append(rec)
                            log(_line(rec))
            if "lockstep" in r.systems:
                sweep = r.lockstep_max_running if w.arrival == "offline" else [r.max_running_requests]
                for mr in sweep:
                    rec = run_one(cfg, "lockstep", g, max_running=mr, rate_per_gpu=rate, table=table)
                    records.append(rec)
                    log(_line(rec))
    summary = summarize(records)
    summary["device_table"] = table.to_dict()
    return records, summary


def _line(rec: dict) -> str:
    rate = f" rate={rec['request_rate']:.0f}/s" if rec["request_rate"] else ""
    waves = f" waves={rec['attention_waves']}" if rec.get("attention_waves") else " " * 8
    return (f"{rec['gpus']:3d} GPUs {rec['system']:8s} {rec['policy']:8s} max_running={rec['max_running_requests']:4d}"
            f"{waves}{rate}: {rec['tokens_per_s']:9.0f} tok/s  itl p50 {rec['itl_ms_p50']:7.2f} ms  "
            f"attn batch {rec['mean_attention_batch']:6.1f}  expert batch {rec['mean_expert_batch']:6.1f}  "
            f"idle {rec['idle_fraction']:.2f}  ({rec['wall_s']:.1f}s)")


def summarize(records: list[dict]) -> dict:
    best: dict = {}
    for rec in records:
        key = (rec["gpus"], rec["system"], rec["request_rate"])
        if key not in best or rec["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = rec
    for rec in records:
        rec["best"] = best[(rec["gpus"], rec["system"], rec["request_rate"])] is rec
    out: dict = {"best": [], "aep_over_lockstep": {}, "scaling": {}}
    for (g, sysname, rate), rec in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        out["best"].append({k: rec[k] for k in ("gpus", "system", "policy", "request_rate", "max_running_requests",
                                                 "attention_waves", "tokens_per_s", "itl_ms_p50",
                                                 "mean_attention_batch", "mean_expert_batch", "idle_fraction")})
        if sysname == "aep" and (g, "lockstep", rate) in best:
            lk = best[(g, "lockstep", rate)]["tokens_per_s"]
            key = str(g) if rate is None else f"{g}@{rate:g}"
            out["aep_over_lockstep"][key] = rec["tokens_per_s"] / lk if lk else math.inf
    for sysname in ("aep", "lockstep"):
        pts = sorted((g, rec["tokens_per_s"]) for (g, s, rate), rec in best.items() if s == sysname and rate is None)
        if len(pts) > 1:
            out["scaling"][sysname] = {f"{a[0]}->{b[0]}": b[1] / a[1] for a, b in zip(pts, pts[1:]) if a[1]}
    return out


def write_plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    best = [r for r in records if r.get("best") and r["request_rate"] is None]
    if best:
        fig, ax = plt.subplots(figsize=(6, 4))
        for sysname, marker in (("aep", "o"), ("lockstep", "s")):
            pts = sorted((r["gpus"], r["tokens_per_s"]) for r in best if r["system"] == sysname)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=sysname)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("output tokens/s (best batch limit)")
        ax.set_title("Simulated throughput vs cluster size")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out / "scaling.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    loaded = [r for r in records if r["request_rate"] is not None]
    if loaded:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r["gpus"], r["system"], r["policy"]) for r in loaded}):
            pts = sorted((r["tokens_per_s"], r["itl_ms_p50"]) for r in loaded if (r["gpus"], r["system"], r["policy"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[1]} {key[2]} {key[0]} GPUs")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ITL p50 (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "itl_vs_throughput.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def run_goodput(cfg: SimConfig, out: Path, log=print) -> dict:
    """The goodput headline: results.json = one record per (gpus, system, TPOT SLO)."""
    t0 = time.perf_counter()
    slos, bound = list(cfg.goodput.tpot_slo_ms), cfg.goodput.ttft_p99_ms
    points = []
    for g in cfg.cluster.gpus:
        points += sweep(cfg, g, candidates(cfg), log)
    head = headline(points, slos, bound)
    table = _table(cfg)
    summary = {**ratios(head), "device_table": table.to_dict(),
               "host_costs_used": {k: getattr(table, k) for k in ("attn_step_overhead_s", "expert_step_overhead_s",
                                                                 "msg_send_s", "msg_recv_s", "step_overhead_s")},
               "noise_cv": cfg.noise.cv}
    (out / "results.json").write_text(json.dumps(head, indent=1, default=_json_default))
    (out / "points.json").write_text(json.dumps(points, indent=1, default=_json_default))
    if cfg.goodput.ablation:
        rows = ablation(cfg, log)
        (out / "ablation.json").write_text(json.dumps(rows, indent=1, default=_json_default))
        (out / "ablation.md").write_text(ablation_markdown(rows))
        summary["ablation_gpus"] = cfg.goodput.ablation_gpus
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    from omegaconf import OmegaConf
    summary["config"] = OmegaConf.to_container(OmegaConf.structured(cfg))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    for h in head:
        log(f"{h['gpus']:3d} GPUs {h['system']:8s} TPOT<={h['tpot_slo_ms']:g} ms: goodput "
            f"{h['goodput_tok_s_per_gpu']:8.0f} tok/s/GPU, saturation {h['saturation_tok_s_per_gpu']:8.0f}, best {h['best']}")
    log("AEP/lockstep goodput: " + ", ".join(f"{k}: {v:.2f}x" if v else f"{k}: -"
                                               for k, v in summary["aep_over_lockstep"].items()))
    log("AEP goodput scaling: " + ", ".join(f"{k}: {v:.2f}x" for k, v in summary["aep_scaling"].items()))
    log(f"wrote {out / 'results.json'}, {out / 'points.json'}, {out / 'summary.json'}")
    return summary


def run_and_write(cfg: SimConfig, output: str | Path, log=print) -> dict:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.goodput.enabled:
        return run_goodput(cfg, out, log)
    t0 = time.perf_counter()
    records, summary = run_sim(cfg, log)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    from omegaconf import OmegaConf
    summary["config"] = OmegaConf.to_container(OmegaConf.structured(cfg))
    (out / "results.json").write_text(json.dumps(records, indent=1, default=_json_default))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    plots = write_plots(records, out)
    log("AEP/lockstep: " + ", ".join(f"{k}: {v:.2f}x" for k, v in summary["aep_over_lockstep"].items()))
    for s, d in summary["scaling"].items():
        log(f"scaling {s}: " + ", ".join(f"{k}: {v:.2f}x" for k, v in d.items()))
    log(f"wrote {out / 'results.json'}, {out / 'summary.json'}" + "".join(f", {p}" for p in plots))
    return summary


def _json_default(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o))

