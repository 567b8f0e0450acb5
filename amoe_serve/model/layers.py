"""Small dense building blocks matching Hugging Face numerics (RoPE; RMSNorm is amoe_kernels.rms_norm).

Legend: T=tokens, D=hidden, H=heads, d=head dim.
"""

from __future__ import annotations

import torch


def rope_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def rope_cos_sin(pos_T: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin [T, d] computed in fp32 and cast to the activation dtype, as HF does."""
    freqs = pos_T[:, None].float() * inv_freq[None, :].to(pos_T.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_THd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF/Llama convention, not interleaved pairs)."""
    half = x_THd.shape[-1] // 2
    rot = torch.cat((-x_THd[..., half:], x_THd[..., :half]), dim=-1)
    return x_THd * cos_Td[:, None, :] + rot * sin_Td[:, None, :]


def rope_tables(cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin shaped [T, 1, d] for apply_rope_tables, with sin's first half negated: then
    rotate-half is a swap of halves, and (-a) * s == a * (-s) exactly, so the result is bitwise
    apply_rope's. Built once per step, used by every block."""
    half = sin_Td.shape[-1] // 2
    sin_Td = torch.cat((-sin_Td[:, :half], sin_Td[:, half:]), dim=-1)
    return cos_Td[:, None, :], sin_Td[:, None, :]


def apply_rope_tables(x_THd: torch.Tensor, cos_T1d: torch.Tensor, signed_sin_T1d: torch.Tensor) -> torch.Tensor:
    half = x_THd.shape[-1] // 2
    return x_THd * cos_T1d + torch.cat((x_THd[..., half:], x_THd[..., :half]), dim=-1) * signed_sin_T1d
