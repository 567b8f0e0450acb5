"""AttentionSide + ExpertSide + PagedKVCache vs transformers, per architecture."""

import pytest
import torch

from amoe_serve.kv.cache import PagedKVCache
from amoe_serve.model.attention_side import AttentionSide, AttnSegment
from amoe_serve.model.expert_side import ExpertSide
from tests.model.reference import forward_local, generate_greedy_local, moe_block_local

VARIANTS = ["mixtral", "qwen2_moe", "qwen2_moe_nonorm", "olmoe", "olmoe_clip_bias"]
PROMPTS = [[5, 7, 9, 11, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [99]]


def _load(path):
    attn = AttentionSide.load(path, torch.float32)
    s = attn.spec
    experts = ExpertSide.load(path, s, torch.float32, [(b, e) for b in range(s.num_blocks) for e in range(s.num_experts)])
    return attn, experts


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    from hf_factory import load_hf

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_hf(checkpoints(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", VARIANTS)
def test_prompt_logits_match_hf(name, checkpoints, hf_models):
    path = checkpoints(name)
    attn, experts = _load(path)
    ids = PROMPTS[1]
    kv = PagedKVCache(attn.spec, 8, 4, torch.float32)
    x = forward_local(attn, experts, torch.tensor(ids), [AttnSegment(0, len(ids), [3, 0, 6, 2])], kv)
    ours = attn.logits(x)
    with torch.no_grad():
        want = hf_models(name)(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_matches_hf_generate(name, checkpoints, hf_models):
    path = checkpoints(name)
    model = hf_models(name)
    ours = generate_greedy_local(path, PROMPTS, 10, torch.float32)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert got == out[0, len(prompt):].tolist()
    assert generate_greedy_local(path, PROMPTS, 10, torch.float32, block_size=3, prefill_chunk=4) == ours


def test_batched_segments_equal_separate_runs(checkpoints):
    """Mixed prefill-chunk + decode batch gives the same hidden states as running each request alone."""
    attn, experts = _load(checkpoints("qwen2_moe"))
    spec = attn.spec
    a, b = PROMPTS[0], PROMPTS[1]
    kv1 = PagedKVCache(spec, 16, 4, torch.float32)
    kv2 = PagedKVCache(spec, 16, 4, torch.float32)
    ta, tb = [0, 1], [5, 7, 9, 11]
    # Separately: a's 4 first tokens then its 5th; b's first 6 then the next 7.
    forward_local(attn, experts, torch.tensor(a[:4]), [AttnSegment(0, 4, ta)], kv1)
    forward_local(attn, experts, torch.tensor(b[:6]), [AttnSegment(0, 6, tb)], kv1)
    xa = forward_local(attn, experts, torch.tensor(a[4:]), [AttnSegment(4, 1, ta)], kv1)
    xb = forward_local(attn, experts, torch.tensor(b[6:]), [AttnSegment(6, 7, tb)], kv1)
    # Batched: same prefixes, then one batch with both continuations.
    forward_local(attn, experts, torch.tensor(a[:4] + b[:6]), [AttnSegment(0, 4, ta), AttnSegment(0, 6, tb)], kv2)
    x = forward_local(attn, experts, torch.tensor(a[4:] + b[6:]), [AttnSegment(4, 1, ta), AttnSegment(6, 7, tb)], kv2)
    torch.testing.assert_close(x, torch.cat([xa, xb]), atol=1e-5, rtol=1e-5)


def test_expert_side_paths_and_combine_determinism(checkpoints):
    path = checkpoints("mixtral")
    attn, experts = _load(path)
    spec = attn.spec
    y = torch.randn(7, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    part = ExpertSide.load(path, spec, torch.float32, [(1, 2), (1, 4)])
    torch.testing.assert_close(part.run(1, 4, y), experts.run(1, 4, y))
    g = part.run_grouped(1, [2, 4], [3, 4], y)
    torch.testing.assert_close(g, torch.cat([experts.run(1, 2, y[:3]), experts.run(1, 4, y[3:])]))
    with pytest.raises(ValueError, match="not held"):
        part.run(1, 0, y)
    # combine is a pure function of its inputs: repeated calls are bitwise equal.
    kv = PagedKVCache(spec, 4, 4, torch.float32)
    h = attn.attention(0, attn.embed(torch.tensor([3, 4, 5])), [AttnSegment(0, 3, [0])], kv)
    r1, r2 = moe_block_local(attn, experts, 0, h), moe_block_local(attn, experts, 0, h)
    assert torch.equal(r1, r2)


def test_kv_cache_write_gather_and_errors(checkpoints):
    attn, _ = _load(checkpoints("olmoe"))
    spec = attn.spec
    kv = PagedKVCache(spec, 6, 4, torch.float32)
    G, d = spec.num_kv_heads, spec.head_dim
    k = torch.randn(10, G, d)
    v = torch.randn(10, G, d)
    table = [5, 1, 3]
    kv.write(2, table, 0, k[:7], v[:7])
    kv.write(2, table, 7, k[7:], v[7:])
    gk, gv = kv.gather(2, table, 10)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert torch.equal(kv.k_LNSGd[2, 1, 0], k[4])  # position 4 -> block 1, row 0
    with pytest.raises(ValueError, match="do not fit"):
        kv.write(0, table, 11, k[:2], v[:2])
    with pytest.raises(ValueError, match="must be"):
        kv.write(0, table, 0, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="segments cover"):
        attn.attention(0, attn.embed(torch.tensor([1, 2])), [AttnSegment(0, 3, table)], kv)
    with pytest.raises(ValueError, match="token ids"):
        attn.embed(torch.tensor([spec.vocab_size]))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_bf16_matches_hf_bf16(arch, tmp_path):
    """bf16 checkpoint run in bf16: same casts as transformers (logits agree to bf16 noise, same greedy tokens)."""
    from hf_factory import load_hf, make_checkpoint

    path = make_checkpoint(arch, tmp_path / arch, seed=7, dtype=torch.bfloat16)
    model = load_hf(path, torch.bfloat16)
    attn = AttentionSide.load(path, None)
    assert attn.dtype == torch.bfloat16
    s = attn.spec
    experts = ExpertSide.load(path, s, None, [(b, e) for b in range(s.num_blocks) for e in range(s.num_experts)])
    ids = PROMPTS[1]
    x = forward_local(attn, experts, torch.tensor(ids), [AttnSegment(0, len(ids), [0, 1, 2, 3])], PagedKVCache(s, 4, 4, torch.bfloat16))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(attn.logits(x), want, atol=0.1, rtol=0.02)
    ours = generate_greedy_local(path, PROMPTS[:2], 8, None)
    for prompt, got in zip(PROMPTS[:2], ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        assert got == out[0, len(prompt):].tolist()
