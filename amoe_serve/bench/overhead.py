"""The data plane's own cost, per rank, as a Markdown table (configs/bench/overhead.yaml runs it
on a near-zero-compute checkpoint, where this is nearly all there is)."""

from __future__ import annotations


def overhead_table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("rank_overhead")]
    if not rows:
        return ""
    f = lambda x, p=0: "-" if x is None else f"{x:.{p}f}"  # noqa: E731 (integers by default)
    out = ["", "Per rank (host work per executed batch, wall and CPU; CPU per 1,000 output tokens; the "
           "transport's cost per message):", "",
           "| system | rate | rank | role | steps/s | µs busy per step | CPU µs per step | CPU ms per 1k tokens "
           "| idle | msgs sent | µs per send | msgs received | µs per receive |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for rank, o in sorted(r["rank_overhead"].items(), key=lambda kv: int(kv[0])):
            idle = (r.get("rank_idle") or {}).get(rank)
            cpu, steps, toks = o.get("cpu_s"), o.get("steps"), r.get("output_tokens")
            out.append(f"| {r['system']} | {r['request_rate'] or 'offline'} | {rank} | {o['role']} | "
                       f"{f(o.get('steps_per_s'))} | {f(o.get('us_per_step'))} | "
                       f"{f(cpu / steps * 1e6 if cpu is not None and steps else None)} | "
                       f"{f(cpu / toks * 1e6 if cpu is not None and toks else None, 1)} | {f(idle, 2)} | "
                       f"{f(o.get('msgs_sent'))} | {f(o.get('us_per_msg_sent'), 1)} | "
                       f"{f(o.get('msgs_received'))} | {f(o.get('us_per_msg_received'), 1)} |")
    return "\n".join(out) + "\n"
