"""Cost model: seconds per operation from a device table.

GPU tables are rooflines: an operation takes max(flops / (peak * flop_eff), bytes / (bw * bw_eff))
plus a fixed cost per kernel launch and per executed step (host-side scheduling), so a small
expert batch is bandwidth-bound (the expert's weights are read whatever the batch) and a large
one compute-bound. Peak numbers come from the vendors' public spec sheets (dense bf16 tensor
core FLOP/s, HBM bandwidth, NVLink per direction, node NICs); the efficiency factors, launch
and step overheads are our assumptions and are the same for every simulated system.

The "local" table is calibrated on this machine (`amoe_serve.sim.calibrate`) by timing the ranks'
own code: expert steps per batch size (interpolated), linear fits of an attention step in
(tokens, context) and of the LM head + sampler in rows, and the MPI message latency/bandwidth;
`cores` limits how many ranks compute at once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from amoe_serve.config import ConfigError

from .sim_config import SimModelConfig


@dataclass
class DeviceTable:
    name: str
    peak_flops: float              # dense bf16 FLOP/s (spec sheet)
    mem_bw: float                  # HBM bytes/s (spec sheet)
    memory_bytes: float            # device memory
    flop_eff: float = 0.7          # achieved fraction of peak FLOP/s in a large GEMM (assumed)
    bw_eff: float = 0.8            # achieved fraction of peak bandwidth when streaming weights (assumed)
    kernel_launch_s: float = 6e-6  # per kernel (assumed)
    attn_kernels: int = 8          # norm, qkv, rope, kv write, attention, o-proj, norm, gate+top-k
    expert_kernels: int = 4        # gather/permute, grouped w1|w3, activation, grouped w2
    step_overhead_s: float = 50e-6  # host-side work per executed layer step (assumed, both systems)
    # Measured host work (configs/sim/host-measured.yaml, from the overhead bench): per attention
    # step, per expert step (-1: step_overhead_s), per message sent / received by a rank.
    attn_step_overhead_s: float = -1.0
    expert_step_overhead_s: float = -1.0
    msg_send_s: float = 0.0
    msg_recv_s: float = 0.0
    op_cv: float = -1.0            # measured per-operation time CV (-1: not measured)
    sampler_s: float = 20e-6       # sampling per attention step at block 0
    intra_bw: float = 300e9        # bytes/s per direction between GPUs of one node
    intra_lat_s: float = 10e-6
    inter_bw: float = 50e9 / 8     # bytes/s per GPU between nodes (node NIC bandwidth / GPUs)
    inter_lat_s: float = 25e-6
    gpus_per_node: int = 8
    cores: int = 0                 # >0: at most this many ranks compute at once (CPU machine)
    # Calibrated tables (local): [[rows, seconds], ...] per expert; attention fit
    # t = c0 + c_tok * tokens + c_ctx * sum(context) (seconds), replacing the rooflines.
    expert_points: list = field(default_factory=list)
    attention_fit: list = field(default_factory=list)
    lm_head_fit: list = field(default_factory=list)   # [c0, c_row]: LM head + sampler (seconds)
    source: str = "public spec sheets"

    def to_dict(self) -> dict:
        return asdict(self)


TABLES: dict[str, DeviceTable] = {
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s bf16 dense, 2.0 TB/s HBM2e, NVLink3 600 GB/s
    # bidirectional (300 GB/s per direction); p4d/p4de nodes: 4x100 Gb/s EFA = 50 GB/s per node.
    "a100": DeviceTable(name="a100", peak_flops=312e12, mem_bw=2.0e12, memory_bytes=80e9,
                        intra_bw=300e9, intra_lat_s=10e-6, inter_bw=50e9 / 8, inter_lat_s=25e-6),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink4 900 GB/s
    # bidirectional (450 per direction); 8x400 Gb/s InfiniBand per node = 400 GB/s per node.
    "h100": DeviceTable(name="h100", peak_flops=989e12, mem_bw=3.35e12, memory_bytes=80e9,
                        intra_bw=450e9, intra_lat_s=8e-6, inter_bw=400e9 / 8, inter_lat_s=15e-6,
                        kernel_launch_s=5e-6),
}

LOCAL_DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "sim" / "local-calibrated.yaml"


def load_table(name_or_path: str) -> DeviceTable:
    """A built-in table name, "local" (configs/sim/local-calibrated.yaml) or a YAML file."""
    if name_or_path in TABLES:
        return DeviceTable(**asdict(TABLES[name_or_path]))
    path = LOCAL_DEFAULT if name_or_path == "local" else Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"device table {name_or_path!r}: not a built-in ({', '.join(TABLES)}) "
                          f"and no such file {path}")
    from omegaconf import OmegaConf
    data = OmegaConf.to_container(OmegaConf.load(path))
    data = data.get("device", data)
    known = {f.name for f in fields(DeviceTable)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"device table {path}: unknown keys {sorted(unknown)}")
    return DeviceTable(**data)


class CostModel:
    """Seconds per attention step, expert step and message, for one model shape on one device."""

    def __init__(self, table: DeviceTable, model: SimModelConfig) -> None:
        self.t = table
        self.m = model
        m = model
        self.bpe = m.dtype_bytes
        # Attention-side weights per block: q, k, v, o projections and the router.
        qo = 2 * m.hidden * m.num_heads * m.head_dim
        kv = 2 * m.hidden * m.num_kv_heads * m.head_dim
        self.attn_params = qo + kv + m.hidden * m.num_experts
        self.expert_params = 3 * m.hidden * m.ffn
        self.lm_head_params = m.vocab * m.hidden
        self.kv_bytes_per_token_block = 2 * m.num_kv_heads * m.head_dim * self.bpe
        self._flops = table.peak_flops * table.flop_eff
        self._bw = table.mem_bw * table.bw_eff
        if table.expert_points:
            pts = np.asarray(sorted(table.expert_points), dtype=np.float64)
            # Measurements are noisy: time never decreases with more rows.
            self._ex_n, self._ex_s = pts[:, 0], np.maximum.accumulate(pts[:, 1])
        else:
            self._ex_n = None
        self._cache: dict[int, float] = {}
        self.shared_params = 3 * m.hidden * m.shared_ffn * m.shared_experts
        self.attn_overhead_s = table.attn_step_overhead_s if table.attn_step_overhead_s >= 0 else table.step_overhead_s
        self.expert_overhead_s = (table.expert_step_overhead_s if table.expert_step_overhead_s >= 0
                                  else table.step_overhead_s)

    # -- experts -------------------------------------------------------------------------
    def _expert_core(self, rows: int) -> float:
        """One expert's FFN on `rows` rows, without fixed per-step costs."""
        if self._ex_n is not None:
            n, s = self._ex_n, self._ex_s
            if rows <= n[-1]:
                return float(np.interp(rows, n, s))
            slope = (s[-1] - s[-2]) / (n[-1] - n[-2]) if len(n) > 1 else s[-1] / n[-1]
            return float(s[-1] + slope * (rows - n[-1]))
        m = self.m
        flops = 6.0 * rows * m.hidden * m.ffn
        nbytes = (self.expert_params + rows * (2 * m.hidden + 2 * m.ffn)) * self.bpe
        return max(flops / self._flops, nbytes / self._bw)

    def expert_time(self, counts) -> float:
        """One executed expert step over several experts' batches (a grouped GEMM on a GPU)."""
        total = 0.0
        any_rows = False
        for c in counts:
            if c > 0:
                any_rows = True
                v = self._cache.get(c)
                if v is None:
                    v = self._cache[c] = self._expert_core(int(c))
                total += v
        if not any_rows:
            return 0.0
        if self._ex_n is not None:  # measured times already include the per-call overhead
            return total + self.expert_overhead_s
        return total + self.t.expert_kernels * self.t.kernel_launch_s + self.expert_overhead_s

    # -- attention -----------------------------------------------------------------------
    def attention_time(self, tokens: int, ctx_sum: float, prefill_sq: float = 0.0,
                       lm_rows: int = 0) -> float:
        """One attention step of one block.

        tokens: new tokens in the batch; ctx_sum: sum over new tokens of the context each
        attends to (decode: its position); prefill_sq is unused by the fitted table (ctx_sum
        already counts each prefill token's own causal context). lm_rows > 0 adds the LM head +
        sampler for that many rows (charged at block 0).
        """
        if tokens <= 0:
            return 0.0
        t, m = self.t, self.m
        if t.attention_fit:
            c0, c_tok, c_ctx = t.attention_fit
            s = c0 + c_tok * tokens + c_ctx * ctx_sum + self.attn_overhead_s
        else:
            flops = 2.0 * tokens * self.attn_params + 4.0 * m.num_heads * m.head_dim * ctx_sum
            nbytes = (self.attn_params * self.bpe + tokens * 4 * m.hidden * self.bpe
                      + ctx_sum_kv_bytes(ctx_sum, tokens, self.kv_bytes_per_token_block))
            s = max(flops / self._flops, nbytes / self._bw) + t.attn_kernels * t.kernel_launch_s \
                + self.attn_overhead_s
            if self.shared_params:  # shared experts run on the attention side, as AttentionCore does
                s += max(6.0 * tokens * m.hidden * m.shared_ffn * m.shared_experts / self._flops,
                         (self.shared_params + tokens * 4 * m.hidden) * self.bpe / self._bw) \
                    + t.expert_kernels * t.kernel_launch_s
        if lm_rows > 0:
            s += self.lm_head_time(lm_rows)
        return s

    def lm_head_time(self, rows: int) -> float:
        if self.t.lm_head_fit:
            c0, c_row = self.t.lm_head_fit
            return c0 + c_row * rows
        if self.t.attention_fit:
            return self.t.sampler_s
        flops = 2.0 * rows * self.lm_head_params
        nbytes = self.lm_head_params * self.bpe
        return max(flops / self._flops, nbytes / self._bw) + 2 * self.t.kernel_launch_s + self.t.sampler_s

    # -- transfers -----------------------------------------------------------------------
    def row_bytes(self) -> int:
        """Bytes of one routed row (hidden activation) plus its metadata (3 int32)."""
        return self.m.hidden * self.bpe + 12

    def link(self, same_node: bool) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) of a GPU-to-GPU message."""
        if same_node:
            return self.t.intra_bw, self.t.intra_lat_s
        return self.t.inter_bw, self.t.inter_lat_s

    def transfer_time(self, nbytes: float, same_node: bool = True) -> float:
        bw, lat = self.link(same_node)
        return lat + nbytes / bw

    # -- memory --------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        return self.m.num_blocks * self.kv_bytes_per_token_block

    def attention_weight_bytes(self) -> float:
        m = self.m
        return (m.num_blocks * (self.attn_params + self.shared_params) + 2 * self.lm_head_params) * self.bpe

    def expert_weight_bytes(self, experts_per_gpu: float) -> float:
        return self.m.num_blocks * experts_per_gpu * self.expert_params * self.bpe


def ctx_sum_kv_bytes(ctx_sum: float, tokens: int, per_token: int) -> float:
    """KV bytes read: each new token reads the K and V of its context."""
    return ctx_sum * per_token


def compute_bound_rows(table: DeviceTable, model: SimModelConfig) -> float:
    """Rows per expert where the roofline turns from bandwidth- to compute-bound."""
    cm = CostModel(table, model)
    m = model
    # 6 r D F / flops = (3 D F + r (2D + 2F)) bpe / bw  ->  solve for r
    a = 6.0 * m.hidden * m.ffn / cm._flops - (2 * m.hidden + 2 * m.ffn) * cm.bpe / cm._bw
    return cm.expert_params * cm.bpe / cm._bw / a if a > 0 else float("inf")
