"""Plots and a Markdown table of results.json, so a person can look instead of read."""

from __future__ import annotations

from pathlib import Path

from amoe_serve.bench.overhead import overhead_table

COLORS = {"aep": "tab:blue", "lockstep": "tab:orange", "hf-transformers": "tab:green", "vllm": "tab:red"}


def _f(x, p: int = 1) -> str:
    return "-" if x is None else f"{x:.{p}f}"


def ratio_table(records: list[dict]) -> str:
    rows = ["| workload | rate (req/s) | system | tokens/s | vs lockstep | ITL p50 ms | ITL p99 ms | TTFT p50 ms | mean expert batch | idle | roofline |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = _f
    for r in records:
        base = next((b for b in records if b["system"] == "lockstep" and b["workload"] == r["workload"]
                     and b["request_rate"] == r["request_rate"]), None)
        if base is None and r["system"] == "hf-transformers":  # hf runs offline only
            base = next((b for b in records if b["system"] == "lockstep" and b["workload"] == r["workload"]
                         and b["request_rate"] == 0), None)
        rel = r["output_tokens_per_s"] / base["output_tokens_per_s"] if base else None
        rows.append(f"| {r['workload']} | {r['request_rate'] or 'offline'} | {r['system']} | "
                    f"{f(r['output_tokens_per_s'])} | {'-' if rel is None else f'{rel:.2f}x'} | {f(r.get('itl_ms_p50'))} | "
                    f"{f(r.get('itl_ms_p99'))} | {f(r.get('ttft_ms_p50'))} | {f(r.get('mean_expert_batch'))} | "
                    f"{f(r.get('idle_fraction'), 2)} | {f(r.get('roofline_fraction'), 3)} |")
    placed = sorted({r["placement"] for r in records if r.get("placement", "contiguous") != "contiguous"})
    note = (f"\nExpert placement of AEP and lockstep: {', '.join(placed)} (planned on placement-trace.json, "
            "a routing trace of held-out requests).\n" if placed else "")
    return "\n".join(rows) + "\n" + note


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def sim_goodput_table(checks: list[dict]) -> str:
    rows = []
    for c in checks:
        if "error" in c:
            rows.append(f"| {c['workload']} | not simulated: {c['error']} | | | | |")
            continue
        mg, pg = c["measured_goodput"], c["predicted_goodput"]
        rows.append(f"| {c['workload']} | {mg['aep']['tokens_per_s']:.1f} / {mg['lockstep']['tokens_per_s']:.1f} | "
                    f"{pg['aep']['tokens_per_s']:.1f} / {pg['lockstep']['tokens_per_s']:.1f} | "
                    f"{_x(c['measured_aep_vs_lockstep'])} | {_x(c['predicted_aep_vs_lockstep'])} | "
                    f"{'-' if c['ratio_error'] is None else format(c['ratio_error'], '.0%')} "
                    f"({c['verdicts_agree']}/{len(c['points'])} verdicts agree) |")
    if not rows:
        return ""
    slo = next((c["slo"] for c in checks if "slo" in c), None)
    at = f" at ITL p50 <= {slo['itl_p50_ms']:g} ms, TTFT p99 <= {slo['ttft_p99_ms']:g} ms" if slo else ""
    return "\n".join(["", f"Simulator check, goodput{at} (the bench's Poisson points, same arrival times):", "",
                      "| workload | measured goodput AEP / lockstep (tok/s) | predicted | measured AEP/lockstep | "
                      "predicted | off by |", "|---|---|---|---|---|---|", *rows]) + "\n"


def sim_check_table(checks: list[dict]) -> str:
    goodput = sim_goodput_table([c for c in checks if c.get("kind") == "goodput"])
    checks = [c for c in checks if c.get("kind", "saturation") == "saturation"]
    if not checks:
        return goodput
    rows = ["", "Simulator check (local table calibrated in this run, same deployment and workload, offline):", "",
            "| workload | measured AEP/lockstep | predicted | off by |", "|---|---|---|---|"]
    for c in checks:
        if "error" in c:
            rows.append(f"| {c['workload']} | - | not simulated: {c['error']} | - |")
            continue
        rows.append(f"| {c['workload']} | {c['measured_aep_vs_lockstep']:.2f}x | "
                    f"{c['predicted_aep_vs_lockstep']:.2f}x | {c['ratio_error']:.0%} |")
    return "\n".join(rows) + "\n" + goodput


def goodput_md(goodput: list[dict], slo: dict | None) -> str:
    """The goodput table: per system, output tokens/s at the highest Poisson rate that met the
    SLO, beside its saturation (offline) tokens/s."""
    if not goodput:
        return ""
    f = _f
    head = (f"Goodput at the SLO ITL p50 <= {slo['itl_p50_ms']:g} ms and TTFT p99 <= {slo['ttft_p99_ms']:g} ms "
            "(output tokens/s at the highest Poisson rate that met it):" if slo else "Goodput:")
    rows = ["", head, "",
            "| workload | system | goodput tokens/s | at rate (req/s) | saturation tokens/s | goodput / saturation | rates: met SLO? |",
            "|---|---|---|---|---|---|---|"]
    for g in goodput:
        rates = ", ".join(f"{v['request_rate']:g} {'yes' if v['meets_slo'] else 'no'}" for v in g["rates"])
        good = g["goodput_tokens_per_s"]
        rows.append(f"| {g['workload']} | {g['system']} | {'- (no Poisson rate run)' if good is None else f(good)} | "
                    f"{f(g['goodput_request_rate'], 2) if g['goodput_request_rate'] is not None else '-'} | "
                    f"{f(g['saturation_tokens_per_s'])} | {f(g['goodput_vs_saturation'], 2)} | {rates or '-'} |")
    return "\n".join(rows) + "\n"


def skipped_md(skipped: list[dict]) -> str:
    if not skipped:
        return ""
    return "\n" + "\n".join(f"Skipped: `{s['system']}`: {s['reason']}" for s in skipped) + "\n"


def hf_sweep_md(records: list[dict]) -> str:
    rows = []
    for r in records:
        if r["system"] == "hf-transformers" and r.get("hf_sweep"):
            runs = ", ".join(f"{s['batch_size']}: {s['output_tokens_per_s']:.1f}" for s in r["hf_sweep"])
            rows.append(f"transformers `generate`, {r['workload']}: tokens/s by batch size {runs}; "
                        f"best {r['hf_batch_size']}.")
    return ("\n" + "\n".join(rows) + "\n") if rows else ""


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def write_report(records: list[dict], out: Path, checks: list[dict] | None = None, goodput: list[dict] | None = None,
                 skipped: list[dict] | None = None, slo: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.md").write_text(ratio_table(records) + hf_sweep_md(records) + goodput_md(goodput or [], slo)
                                    + skipped_md(skipped or []) + overhead_table(records) + sim_check_table(checks or []))
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    ax = axes[0]
    for system in COLORS:
        pts = [(r["itl_ms_p50"], r["output_tokens_per_s"]) for r in records
               if r["system"] == system and r.get("itl_ms_p50") is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "o-", color=COLORS[system], label=system)
        elif system == "hf-transformers":
            for r in records:
                if r["system"] == system:
                    ax.axhline(r["output_tokens_per_s"], color=COLORS[system], ls="--",
                               label=f"{system} (offline, batch {r.get('hf_batch_size')})")
    ax.set_xlabel("inter-token latency p50 (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs latency")
    _legend(ax)
    ax = axes[1]
    for system in ("aep", "lockstep"):
        hist: dict[int, int] = {}
        for r in records:
            if r["system"] == system:
                for k, v in (r.get("expert_batch_hist") or {}).items():
                    hist[int(k)] = hist.get(int(k), 0) + v
        if hist:
            ks = sorted(hist)
            ax.bar([str(k) for k in ks], [hist[k] for k in ks], alpha=0.6, color=COLORS[system], label=system)
    ax.set_xlabel("executed expert batch (rows, power-of-two bucket)")
    ax.set_ylabel("batches")
    ax.set_title("expert batch sizes")
    _legend(ax)
    ax = axes[2]
    for i, system in enumerate(("aep", "lockstep")):
        load: dict[int, int] = {}
        for r in records:
            if r["system"] == system:
                for k, v in (r.get("tokens_per_expert") or {}).items():
                    load[int(k)] = load.get(int(k), 0) + v
        if load:
            ks = sorted(load)
            ax.bar([k + (i - 0.5) * 0.4 for k in ks], [load[k] for k in ks], width=0.4, color=COLORS[system], label=system)
    ax.set_xlabel("expert")
    ax.set_ylabel("rows (all blocks)")
    ax.set_title("per-expert load")
    _legend(ax)
    ax = axes[3]
    rows = goodput or []
    labels = [g["system"] if len({x["workload"] for x in rows}) < 2 else f"{g['system']}\n{g['workload']}" for g in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [g["saturation_tokens_per_s"] or 0 for g in rows], width=0.4,
           color="lightgray", label="saturation (offline)")
    ax.bar([x + 0.2 for x in xs], [g["goodput_tokens_per_s"] or 0 for g in rows], width=0.4,
           color=[COLORS.get(g["system"], "gray") for g in rows], label="goodput at the SLO")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("output tokens/s")
    ax.set_title("goodput" + (f" (ITL p50 <= {slo['itl_p50_ms']:g} ms, TTFT p99 <= {slo['ttft_p99_ms']:g} ms)"
                              if slo else ""), fontsize=9)
    if rows:
        _legend(ax)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
