"""Reference causal GQA attention of new tokens over a paged KV context.

Legend: n=new tokens of one request, L=context length (start_pos + n), H=heads, G=kv heads, d=head dim.
"""

from __future__ import annotations

import torch


def causal_gqa_attention(q_nHd: torch.Tensor, k_LGd: torch.Tensor, v_LGd: torch.Tensor, start_pos: int, scale: float):
    """Query i sits at absolute position start_pos+i and sees keys 0..start_pos+i. Returns [n, H*d].

    Matches HF eager attention: scores in activation dtype, softmax in fp32, cast back, then @ V.
    """
    n, H, d = q_nHd.shape
    L, G, _ = k_LGd.shape
    rep = H // G
    # Head h uses kv head h // rep (HF repeat_kv layout).
    k_HLd = k_LGd.permute(1, 0, 2).repeat_interleave(rep, dim=0)
    v_HLd = v_LGd.permute(1, 0, 2).repeat_interleave(rep, dim=0)
    q_Hnd = q_nHd.transpose(0, 1)
    s_HnL = torch.matmul(q_Hnd, k_HLd.transpose(1, 2)) * scale
    q_pos = torch.arange(start_pos, start_pos + n, device=q_nHd.device)
    k_pos = torch.arange(L, device=q_nHd.device)
    future_nL = k_pos[None, :] > q_pos[:, None]
    s_HnL = s_HnL.masked_fill(future_nL[None], float("-inf"))
    p_HnL = torch.softmax(s_HnL, dim=-1, dtype=torch.float32).to(q_nHd.dtype)
    o_Hnd = torch.matmul(p_HnL, v_HLd)
    return o_Hnd.transpose(0, 1).reshape(n, H * d)
