"""Spec parsing, weight loading (sharded, bf16, filtered, fused layout) and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from amoe_serve.model.checkpoint import (
    attention_side_filter,
    expert_filter,
    is_expert_weight,
    load_weights,
)
from amoe_serve.model.spec import CheckpointError, load_spec
from tests.model.hf_factory import write_fused_experts


def test_spec_per_arch(checkpoints):
    m = load_spec(checkpoints("mixtral"))
    assert (m.architecture, m.num_experts, m.top_k, m.head_dim, m.num_kv_heads) == ("mixtral", 6, 2, 24, 2)
    assert m.norm_topk_prob and m.route_weights_fp32 and m.shared_expert_intermediate_size == 0
    q = load_spec(checkpoints("qwen2_moe"))
    assert q.attention_bias and q.shared_expert_intermediate_size == 64 and q.expert_intermediate_size == 80
    assert not load_spec(checkpoints("qwen2_moe_nonorm")).norm_topk_prob
    o = load_spec(checkpoints("olmoe_clip_bias"))
    assert o.qk_norm and o.clip_qkv == 0.6 and o.o_bias and o.eos_token_ids == (2,)


def _all_names(path):
    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    return names


def test_sharded_equals_single(checkpoints, tmp_path):
    from hf_factory import make_checkpoint

    single = checkpoints("qwen2_moe")
    spec = load_spec(single)
    sharded = make_checkpoint("qwen2_moe", tmp_path / "sh", seed=1, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    a = load_weights(single, spec, None, lambda n: True)
    b = load_weights(sharded, spec, None, lambda n: True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Internal naming: 6 experts x 3 blocks x 3 matrices.
    assert sum(is_expert_weight(k) is not None for k in a) == 54
    assert a["model.layers.2.mlp.experts.5.w1"].shape == (80, 96)


def test_filters_load_only_requested(checkpoints):
    path = checkpoints("mixtral")
    spec = load_spec(path)
    att = load_weights(path, spec, None, attention_side_filter())
    assert att and all(is_expert_weight(k) is None for k in att)
    assert "model.layers.0.mlp.gate.weight" in att  # block_sparse_moe renamed to mlp
    ex = load_weights(path, spec, None, expert_filter([(0, 1), (2, 5)]))
    assert sorted(ex) == sorted(f"model.layers.{b}.mlp.experts.{e}.{w}" for b, e in [(0, 1), (2, 5)] for w in ("w1", "w2", "w3"))


def test_bf16_checkpoint_and_dtype_cast(tmp_path):
    from hf_factory import make_checkpoint

    path = make_checkpoint("olmoe", tmp_path / "bf", dtype=torch.bfloat16)
    spec = load_spec(path)
    w = load_weights(path, spec, None, lambda n: True)
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    w32 = load_weights(path, spec, torch.float32, expert_filter([(1, 3)]))
    assert all(t.dtype == torch.float32 for t in w32.values()) and len(w32) == 3


def test_fused_expert_layout(checkpoints, tmp_path):
    """transformers-v5 in-memory layout: experts.gate_up_proj [E, 2F, D] + experts.down_proj [E, D, F]."""
    src = checkpoints("olmoe")
    spec = load_spec(src)
    ref = load_weights(src, spec, None, lambda n: True)
    out = write_fused_experts(src, tmp_path / "fused")
    got = load_weights(out, spec, None, lambda n: True)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    part = load_weights(out, spec, None, expert_filter([(1, 4)]))
    assert sorted(part) == [f"model.layers.1.mlp.experts.4.{w}" for w in ("w1", "w2", "w3")]


def test_errors(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_spec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_spec(tmp_path / "empty")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_spec(bad)
    unk = tmp_path / "llama"
    unk.mkdir()
    (unk / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="MixtralForCausalLM, Qwen2MoeForCausalLM, OlmoeForCausalLM"):
        load_spec(unk)

    src = checkpoints("mixtral")
    cfg = json.loads((src / "config.json").read_text())
    for key, val, msg in (
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope"),
        ("hidden_act", "gelu", "hidden_act"),
    ):
        d = tmp_path / f"cfg_{key}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(cfg, **{key: val})))
        with pytest.raises(CheckpointError, match=msg):
            load_spec(d)
    qcfg = json.loads((checkpoints("qwen2_moe") / "config.json").read_text())
    for over, msg in (({"mlp_only_layers": [1]}, "mlp_only_layers"), ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                      ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "sliding")):
        d = tmp_path / f"q_{next(iter(over))}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(qcfg, **over)))
        with pytest.raises(CheckpointError, match=msg):
            load_spec(d)

    spec = load_spec(src)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(src / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(corrupt, spec, None, lambda n: True)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    shutil.copy(src / "config.json", truncated / "config.json")
    data = (src / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(truncated, spec, None, lambda n: True)
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_weights(tmp_path / "empty", spec, None, lambda n: True)
    idx = tmp_path / "missing_shard"
    idx.mkdir()
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_weights(idx, spec, None, lambda n: True)
