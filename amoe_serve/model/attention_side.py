"""AttentionSide: embeddings, attention, norms, router, shared expert and LM head.

Everything except the routed experts; it lives on attention ranks (and in local mode).
Legend: T=tokens in the batch, D=hidden, H=heads, G=kv heads, d=head dim, E=experts,
K=top-k slots, V=vocab, F=shared-expert ffn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as Fn

import amoe_kernels as K

from ..kv.batch import PagedBatch
from ..kv.cache import PagedKVCache
from .checkpoint import attention_side_filter, load_weights
from .layers import apply_rope_tables, rope_cos_sin, rope_inv_freq, rope_tables
from .spec import CheckpointError, ModelSpec, load_spec


@dataclass
class AttnSegment:
    """One request's new tokens in an attention batch."""

    start_pos: int  # tokens of this request already in the KV cache
    num_tokens: int  # new tokens (prompt chunk for prefill, 1 for decode)
    block_table: list[int]  # KV blocks, already big enough for start_pos + num_tokens


def required_weight_names(spec: ModelSpec) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for b in range(spec.num_blocks):
        p = f"model.layers.{b}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "mlp.gate.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if spec.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if spec.o_bias:
            names.append(p + "self_attn.o_proj.bias")
        if spec.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        if spec.shared_expert_intermediate_size:
            names += [p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
            names.append(p + "mlp.shared_expert_gate.weight")
    return names


class AttentionSide:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], where: str = "checkpoint",
                 compute_dtype: Optional[torch.dtype] = None):
        """compute_dtype: the activations' (and KV cache's) dtype; None = the weights'. With fp32
        over bf16 weights, vectors and routers are widened at rest (a few MB) and the matrices
        widened per call (amoe_kernels.linear)."""
        missing = [n for n in required_weight_names(spec) if n not in weights]
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{where}: missing tensors {missing[:5]}{more}")
        self.spec = spec
        self.w = weights
        at_rest = weights["model.embed_tokens.weight"].dtype
        self.dtype = compute_dtype or at_rest
        if self.dtype != at_rest:
            for n, t in weights.items():
                if t.dim() == 1 or n.endswith("mlp.gate.weight") or n.endswith("shared_expert_gate.weight"):
                    weights[n] = t.to(self.dtype)
        # amoe_kernels.linear: on fp32 CPU the function the fused block step calls (so both paths
        # give the same bits); weights narrower than activations are widened per call.
        self._linear = K.linear
        self.lm_head_VD = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        self.inv_freq = rope_inv_freq(spec.rope_theta, spec.head_dim)
        self.scale = spec.head_dim**-0.5
        # block_step's native calls cover the plain Mixtral-style block in one dtype.
        self._fusable = (self.dtype == at_rest == torch.float32 and not spec.attention_bias and not spec.o_bias
                         and not spec.qk_norm and spec.clip_qkv is None)
        self.has_shared_expert = bool(spec.shared_expert_intermediate_size)
        self._check_shapes(where)
        # One fused [q; k; v] projection per block: one GEMM instead of three per step.
        self.qkv_w: list[torch.Tensor] = []
        self.qkv_b: list[Optional[torch.Tensor]] = []
        for b in range(spec.num_blocks):
            names = [f"model.layers.{b}.self_attn.{x}_proj" for x in "qkv"]
            self.qkv_w.append(torch.cat([weights.pop(n + ".weight") for n in names]))
            self.qkv_b.append(torch.cat([weights.pop(n + ".bias") for n in names]) if spec.attention_bias else None)
        # block_step's weights per block, looked up once (input norm, qkv, o, post norm, router).
        self._step_w = [(self._p(b, "input_layernorm.weight"), self.qkv_w[b], self._p(b, "self_attn.o_proj.weight"),
                         self._p(b, "post_attention_layernorm.weight"), self._p(b, "mlp.gate.weight"))
                        for b in range(spec.num_blocks)]

    def _check_shapes(self, where: str) -> None:
        s = self.spec
        D, H, G, d = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
        expect = {
            "model.embed_tokens.weight": (s.vocab_size, D),
            "model.layers.0.self_attn.q_proj.weight": (H * d, D),
            "model.layers.0.self_attn.k_proj.weight": (G * d, D),
            "model.layers.0.mlp.gate.weight": (s.num_experts, D),
        }
        for n, shape in expect.items():
            if n in self.w and tuple(self.w[n].shape) != shape:
                raise CheckpointError(f"{where}: {n} has shape {tuple(self.w[n].shape)}, config implies {shape}")

    @classmethod
    def load(cls, path: str | Path, dtype: Optional[torch.dtype], device: str | torch.device = "cpu",
             compute_dtype: Optional[torch.dtype] = None) -> "AttentionSide":
        spec = load_spec(path)
        weights = load_weights(path, spec, dtype, attention_side_filter())
        weights = {n: t.to(device) for n, t in weights.items()}
        return cls(spec, weights, str(path), compute_dtype)

    def _p(self, b: int, name: str) -> torch.Tensor:
        return self.w[f"model.layers.{b}.{name}"]

    @torch.inference_mode()
    def embed(self, ids_T: torch.Tensor) -> torch.Tensor:
        ids_T = torch.as_tensor(ids_T, dtype=torch.int64)
        if ids_T.dim() != 1:
            raise ValueError(f"embed: ids must be 1-D [T], got shape {tuple(ids_T.shape)}")
        if ids_T.numel() and (int(ids_T.min()) < 0 or int(ids_T.max()) >= self.spec.vocab_size):
            raise ValueError(f"embed: token ids must be in [0, {self.spec.vocab_size})")
        x_TD = Fn.embedding(ids_T.to(self.lm_head_VD.device), self.w["model.embed_tokens.weight"])
        return x_TD if x_TD.dtype == self.dtype else x_TD.to(self.dtype)

    @torch.inference_mode()
    def attention(self, b: int, x_TD: torch.Tensor, batch: PagedBatch | list[AttnSegment],
                  kv: PagedKVCache) -> torch.Tensor:
        """Block b's attention for a batch of spans (a PagedBatch, built once per step and
        reused by every block, or AttnSegments); writes the new tokens' K/V."""
        s = self.spec
        T = x_TD.shape[0]
        if not isinstance(batch, PagedBatch):
            batch = kv.batch([g.block_table for g in batch], [g.start_pos for g in batch], [g.num_tokens for g in batch])
        if batch.num_tokens != T:
            raise ValueError(f"attention: segments cover {batch.num_tokens} tokens, x has {T}")
        H, G, d = s.num_heads, s.num_kv_heads, s.head_dim
        a = K.rms_norm(x_TD, self._p(b, "input_layernorm.weight"), s.rms_norm_eps)
        qkv_TX = self._linear(a, self.qkv_w[b], self.qkv_b[b])
        q_TX, k_TX, v_TX = qkv_TX.split([H * d, G * d, G * d], dim=1)
        if s.qk_norm:  # OLMoE normalizes the flat projections over all heads
            q_TX = K.rms_norm(q_TX, self._p(b, "self_attn.q_norm.weight"), s.rms_norm_eps)
            k_TX = K.rms_norm(k_TX, self._p(b, "self_attn.k_norm.weight"), s.rms_norm_eps)
        if s.clip_qkv is not None:
            q_TX, k_TX, v_TX = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q_TX, k_TX, v_TX))
        if batch.max_pos >= s.max_position_embeddings:
            raise ValueError(f"attention: position {batch.max_pos} >= max_position_embeddings {s.max_position_embeddings}")
        cos, sin = batch.once(("rope", x_TD.dtype),
                              lambda: rope_tables(*rope_cos_sin(batch.pos_T, self.inv_freq, x_TD.dtype)))
        if s.qk_norm or s.clip_qkv is not None:
            q_THd = apply_rope_tables(q_TX.reshape(T, H, d), cos, sin)
            k_TGd = apply_rope_tables(k_TX.reshape(T, G, d), cos, sin)
            kv.write_slots(b, batch.write_slots_T, k_TGd, v_TX.reshape(T, G, d))
        else:  # q and k heads rotated in one go, k and v written to the cache in the same pass
            q_THd = K.rope_kv_write(qkv_TX, cos.view(T, d), sin.view(T, d), H, G, batch.write_slots_T, *kv.flat(b))
        k_NSGd, v_NSGd = kv.k_LNSGd[b], kv.v_LNSGd[b]
        if len(batch.groups) == 1 and batch.groups[0].rows_Sn is None:
            g = batch.groups[0]  # all decode: the batch's rows are the queries, in order
            if q_THd.is_cuda:
                return self._out(b, x_TD, K.paged_decode_attention(q_THd, k_NSGd, v_NSGd, g.tables_SM, g.klen_S, self.scale))
            return self._out(b, x_TD, K.paged_attention(q_THd[:, None], k_NSGd, v_NSGd, g.blocks_SM, g.qpos_Sn, self.scale,
                                                        future_SnL=g.future_SnL)[:, 0])
        return self._out(b, x_TD, self._grouped_attention(b, q_THd, batch, kv))

    def _grouped_attention(self, b: int, q_THd: torch.Tensor, batch: PagedBatch, kv: PagedKVCache) -> torch.Tensor:
        """o [T, H d] of a batch with prefill spans: decode spans, then prefill spans, two calls
        at most."""
        T, H, d = q_THd.shape
        k_NSGd, v_NSGd = kv.k_LNSGd[b], kv.v_LNSGd[b]
        o_TX = torch.empty(T, H * d, dtype=q_THd.dtype, device=q_THd.device)
        for g in batch.groups:
            o_SnX = K.paged_attention(q_THd[g.rows_Sn], k_NSGd, v_NSGd, g.blocks_SM, g.qpos_Sn, self.scale,
                                      future_SnL=g.future_SnL)
            o_TX[g.rows_Sn[g.valid_Sn]] = o_SnX[g.valid_Sn]
        return o_TX

    @torch.inference_mode()
    def block_step(self, b: int, x_TD: torch.Tensor, batch: PagedBatch, kv: PagedKVCache, key_E: torch.Tensor,
                   num_keys: int, seg: int, route: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """attention + moe_input + route + dispatch_rows (keys key_E[expert]) of block b in
        native calls: (h_TD, y_TD, w_TK, ids_TK, meta_R3, y_RD, counts_X), the bits of those four
        calls. An all-decode batch takes one call; a batch with prompt spans three (their causal
        attention stays the paged_attention call in between). None where the native step does
        not apply (biases, q/k norms or clipping, weights narrower than the activations, CUDA, no
        compiler): call the four then. route: (ids_TK, w_TK) of a synthetic router, else the
        model's."""
        s = self.spec
        if not self._fusable:
            return None
        if batch.max_pos >= s.max_position_embeddings:
            raise ValueError(f"attention: position {batch.max_pos} >= max_position_embeddings {s.max_position_embeddings}")
        T = x_TD.shape[0]
        if batch.num_tokens != T:
            raise ValueError(f"attention: segments cover {batch.num_tokens} tokens, x has {T}")
        cos, sin = batch.once(("rope", x_TD.dtype),
                              lambda: rope_tables(*rope_cos_sin(batch.pos_T, self.inv_freq, x_TD.dtype)))
        cos, sin = cos.view(T, -1), sin.view(T, -1)
        k_XGd, v_XGd = kv.flat(b)
        H, G, d = s.num_heads, s.num_kv_heads, s.head_dim
        ln1, w_qkv, w_o, ln2, w_gate = self._step_w[b]
        k = s.top_k if route is None else route[0].shape[1]  # a synthetic router may pick another top-k
        g = batch.groups[0]
        if len(batch.groups) == 1 and g.rows_Sn is None:  # all decode: one call
            return K.attn_decode_block(x_TD, ln1, w_qkv, w_o, ln2, w_gate, s.rms_norm_eps, H, G, d, cos, sin,
                                       batch.write_slots_T, k_XGd, v_XGd, g.blocks_SM, g.klen_S, kv.block_size,
                                       self.scale, k, s.norm_topk_prob, key_E, num_keys, seg, route)
        q_THd = K.attn_pre(x_TD, ln1, w_qkv, s.rms_norm_eps, H, G, d, cos, sin, batch.write_slots_T, k_XGd,
                           v_XGd)
        if q_THd is None:
            return None
        o_TX = self._grouped_attention(b, q_THd, batch, kv)
        out = K.attn_post(x_TD, o_TX, w_o, ln2, w_gate, s.rms_norm_eps, k, s.norm_topk_prob, key_E, num_keys, seg,
                          route)
        if out is None:
            raise RuntimeError("attn_post refused what attn_pre took")  # the same support rules
        return out

    def _out(self, b: int, x_TD: torch.Tensor, o_TX: torch.Tensor) -> torch.Tensor:
        s = self.spec
        o_bias = self._p(b, "self_attn.o_proj.bias") if s.o_bias else None
        return x_TD + self._linear(o_TX, self._p(b, "self_attn.o_proj.weight"), o_bias)

    @torch.inference_mode()
    def moe_input(self, b: int, h_TD: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(h_TD, self._p(b, "post_attention_layernorm.weight"), self.spec.rms_norm_eps)

    @torch.inference_mode()
    def route(self, b: int, y_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = K.linear(y_TD, self._p(b, "mlp.gate.weight"))
        wdtype = None if self.spec.route_weights_fp32 else logits_TE.dtype
        w_TK, ids_TK = K.topk_gating(logits_TE, self.spec.top_k, self.spec.norm_topk_prob, weight_dtype=wdtype)
        return ids_TK, w_TK

    @torch.inference_mode()
    def shared_expert(self, b: int, y_TD: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.spec.shared_expert_intermediate_size:
            return None
        out_TD = K.expert_ffn(
            y_TD,
            self._p(b, "mlp.shared_expert.gate_proj.weight"),
            self._p(b, "mlp.shared_expert.up_proj.weight"),
            self._p(b, "mlp.shared_expert.down_proj.weight"),
        )
        return torch.sigmoid(Fn.linear(y_TD, self._p(b, "mlp.shared_expert_gate.weight"))) * out_TD

    @torch.inference_mode()
    def combine(
        self, h_TD: torch.Tensor, out_TKD: torch.Tensor, w_TK: torch.Tensor, s_TD: Optional[torch.Tensor]
    ) -> torch.Tensor:
        # Fixed slot-order sum: bitwise identical in every mode that feeds the same inputs.
        return K.moe_combine(h_TD, out_TKD, w_TK, s_TD)

    @torch.inference_mode()
    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = K.rms_norm(x_TD, self.w["model.norm.weight"], self.spec.rms_norm_eps)
        return self._linear(x_TD, self.lm_head_VD).float()
