"""ExpertCore runs a block's queues as one grouped GEMM in expert order, whatever order the
scheduler popped them in, and every reply row still carries its own (segment, token, slot)."""

import torch

import amoe_kernels as K
from amoe_serve.engine.expert_core import ExpertCore
from amoe_serve.model.checkpoint import expert_name
from amoe_serve.model.expert_side import ExpertSide
from amoe_serve.sched.policies import make_scheduler


class _Spec:
    num_blocks, num_experts, hidden_size = 2, 6, 16


def _side(pairs, D=16, F=32):
    g = torch.Generator().manual_seed(5)
    w = {}
    for b, e in pairs:
        for name, shape in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):
            w[expert_name(b, e, name)] = torch.randn(*shape, generator=g)
    return ExpertSide(_Spec(), w, pairs), w


def test_rows_come_back_matched_to_their_experts():
    pairs = [(1, 5), (1, 2), (1, 4)]  # slots 0, 1, 2 hold experts 5, 2, 4: not expert order
    side, w = _side(pairs)
    assert set(w) >= {expert_name(1, 5, "w1")}
    core = ExpertCore(side, pairs, 2, make_scheduler("defrag"), max_batch=512, group_block=True)
    g = torch.Generator().manual_seed(9)
    y = torch.randn(7, 16, generator=g)
    meta = torch.arange(21, dtype=torch.int32).view(7, 3)
    core.receive(src=1, header={"b": 1, "experts": [5, 2, 4], "counts": [3, 2, 2]}, meta_R3=meta, y_RD=y)
    (reply,) = core.step()
    assert core.pending() == 0 and reply.dst == 1 and reply.header == {"b": 1}
    meta_out, out = reply.tensors
    expert_of_row = {int(m[0]): e for m, e in zip(meta, [5, 5, 5, 2, 2, 4, 4])}
    for m, o in zip(meta_out, out):
        i = [int(r[0]) for r in meta].index(int(m[0]))
        e = expert_of_row[int(m[0])]
        want = K.expert_ffn(y[i:i + 1], *(w[expert_name(1, e, n)] for n in ("w1", "w3", "w2")))[0]
        assert torch.allclose(o, want, rtol=1e-4, atol=1e-4), (e, i)  # a 1-row GEMM rounds differently
    assert sorted(meta_out[:, 0].tolist()) == sorted(meta[:, 0].tolist())
