import pytest
import torch

from amoe_serve.sampler import Sampler, SamplingParams, finish_reason, make_generator

V = 32


def _logits(B, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_with_lowest_id_ties():
    logits_BV = _logits(6)
    logits_BV[2] = 0.0  # all tied -> id 0
    logits_BV[3, 5] = logits_BV[3, 9] = 100.0  # tie -> 5
    params = [SamplingParams() for _ in range(6)]
    tok_B = Sampler().sample(logits_BV, params, [None] * 6)
    assert tok_B.dtype == torch.long
    expected = torch.argmax(logits_BV, dim=-1)
    assert torch.equal(tok_B, expected) and tok_B[2] == 0 and tok_B[3] == 5


def test_same_seed_same_tokens_across_batches():
    row_V = _logits(1, seed=7)[0]
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123)

    def run(batch_rows, pos, steps=20):
        toks = []
        gens = [make_generator(p.seed) if i == pos else make_generator(1000 + i) for i in range(batch_rows)]
        params = [p if i == pos else SamplingParams(temperature=0.7) for i in range(batch_rows)]
        for s in range(steps):
            logits_BV = _logits(batch_rows, seed=50 + s)
            logits_BV[pos] = row_V
            toks.append(int(Sampler().sample(logits_BV, params, gens)[pos]))
        return toks

    alone = run(1, 0)
    assert alone == run(5, 3) == run(3, 0)
    assert len(set(alone)) > 1  # actually random, not degenerate


def test_tiny_top_p_is_argmax():
    logits_BV = _logits(8, seed=3)
    params = [SamplingParams(temperature=2.0, top_p=1e-6, seed=i) for i in range(8)]
    gens = [make_generator(i) for i in range(8)]
    for _ in range(5):
        assert torch.equal(Sampler().sample(logits_BV, params, gens), torch.argmax(logits_BV, -1))


def test_temperature_follows_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits_BV = probs.log().expand(4000, 4).contiguous()
    params = [SamplingParams(temperature=1.0) for _ in range(4000)]
    gen = make_generator(0)
    tok_B = Sampler().sample(logits_BV, params, [gen] * 4000)
    freq = torch.bincount(tok_B, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_top_p_excludes_tail():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits_BV = probs.log().expand(2000, 4).contiguous()
    params = [SamplingParams(temperature=1.0, top_p=0.7) for _ in range(2000)]
    tok_B = Sampler().sample(logits_BV, params, [make_generator(1)] * 2000)
    # nucleus = {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 0.625 / 0.375
    assert set(tok_B.tolist()) == {0, 1}
    assert abs((tok_B == 0).float().mean().item() - 0.625) < 0.04


def test_mixed_batch_greedy_rows_unaffected():
    logits_BV = _logits(4, seed=9)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(), SamplingParams(temperature=0.5)]
    gens = [None, make_generator(1), None, make_generator(2)]
    tok_B = Sampler().sample(logits_BV, params, gens)
    am = torch.argmax(logits_BV, -1)
    assert tok_B[0] == am[0] and tok_B[2] == am[2]
    assert ((0 <= tok_B) & (tok_B < V)).all()


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ],
)
def test_validate_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs).validate()


def test_from_dict():
    p = SamplingParams.from_dict({"max_tokens": 4, "temperature": 1, "top_p": 0.5, "seed": 3, "stop_token_ids": [2]})
    assert p == SamplingParams(max_tokens=4, temperature=1.0, top_p=0.5, seed=3, stop_token_ids=[2])
    assert SamplingParams.from_dict({}) == SamplingParams()
    with pytest.raises(ValueError, match="bogus"):
        SamplingParams.from_dict({"bogus": 1, "top_k": 2})
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_dict({"max_tokens": "16"})
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_dict({"max_tokens": True})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_dict({"temperature": "hot"})
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams.from_dict({"ignore_eos": 1})
    with pytest.raises(ValueError, match="dict"):
        SamplingParams.from_dict([1])


def test_sample_shape_errors():
    with pytest.raises(ValueError, match="one params"):
        Sampler().sample(_logits(2), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="B, V"):
        Sampler().sample(torch.zeros(V), [], [])


def test_finish_reason():
    p = SamplingParams(max_tokens=3, stop_token_ids=[7])
    eos = [2]
    assert finish_reason(5, 1, p, eos) is None
    assert finish_reason(7, 1, p, eos) == "stop"
    assert finish_reason(2, 1, p, eos) == "stop"
    assert finish_reason(5, 3, p, eos) == "length"
    assert finish_reason(2, 3, p, eos) == "stop"  # stop wins over length
    q = SamplingParams(max_tokens=3, stop_token_ids=[7], ignore_eos=True)
    assert finish_reason(2, 1, q, eos) is None
    assert finish_reason(7, 1, q, eos) == "stop"  # explicit stop ids still apply


def test_top_k_and_min_p_restrict_the_draws():
    torch.manual_seed(0)
    logits_V = torch.randn(V) * 2
    order = torch.argsort(logits_V, descending=True).tolist()
    gen = make_generator(4)
    k2 = SamplingParams(temperature=1.0, top_k=2)
    toks = Sampler().sample(logits_V.expand(3000, V).contiguous(), [k2] * 3000, [gen] * 3000)
    assert set(toks.tolist()) == set(order[:2])
    probs_V = torch.softmax(logits_V, -1)
    mp = SamplingParams(temperature=1.0, min_p=0.3)
    allowed = {i for i in range(V) if probs_V[i] >= 0.3 * probs_V.max()}
    toks = Sampler().sample(logits_V.expand(3000, V).contiguous(), [mp] * 3000, [make_generator(5)] * 3000)
    assert set(toks.tolist()) == allowed and len(allowed) < V


def test_processing_applies_only_with_a_state():
    from amoe_serve.sampler import RowState

    logits_BV = _logits(2)
    top = int(torch.argmax(logits_BV[0]))
    p = SamplingParams(logit_bias={top: -100.0})
    st = RowState(p, [1], V)
    got = Sampler().sample(logits_BV, [p, p], [None, None], [st, None]).tolist()
    assert got[0] != top  # biased away
    assert got[1] == int(torch.argmax(logits_BV[1]))  # no state: untouched


def test_min_tokens_in_finish_reason():
    p = SamplingParams(max_tokens=5, min_tokens=3, stop_token_ids=[7])
    assert finish_reason(7, 2, p, (2,)) is None and finish_reason(2, 2, p, (2,)) is None
    assert finish_reason(7, 3, p, (2,)) == "stop"


def test_to_dict_round_trip_and_defaults_left_out():
    from amoe_serve.sampler import StructuredSpec

    p = SamplingParams(max_tokens=9, logit_bias={3: 1.5}, logprobs=2, structured=StructuredSpec("regex", "a+"))
    d = p.to_dict()
    assert d == {"max_tokens": 9, "logit_bias": {"3": 1.5}, "logprobs": 2,
                 "structured": {"kind": "regex", "value": "a+"}}
    assert SamplingParams.from_dict(d) == p
    assert SamplingParams().to_dict() == {}
