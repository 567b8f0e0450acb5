"""The full-size checkpoint's code path at test size (#18): OLMoE's architecture with 64 experts
and top-8, bf16 sharded safetensors from the streaming writer, bf16 at rest with fp32 compute,
and ranks that read only their own part. The full-size run: docs/bench/fullsize/README.md."""

import json

import pytest
import torch

from amoe_serve.bench.synth_checkpoint import SHAPES, tensor_shapes, write_checkpoint
from amoe_serve.config import load_config
from amoe_serve.engine.inproc import run_inproc
from amoe_serve.model import load_spec
from amoe_serve.model.attention_side import AttentionSide
from amoe_serve.model.expert_side import ExpertSide
from amoe_serve.requests_io import GenerateRequest
from amoe_serve.sampler import SamplingParams

PROMPTS = [[5, 7, 9, 11, 13], [300, 301, 302, 40, 41, 42, 43], [99]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("olmoe-tiny") / "ckpt"
    write_checkpoint("olmoe-tiny", out, shard_gb=0.002)  # ~2 MB shards: several files
    return out


def test_writer_produces_a_sharded_hub_layout(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["OlmoeForCausalLM"] and cfg["num_experts"] == 64
    assert cfg["num_experts_per_tok"] == 8 and cfg["dtype"] == "bfloat16"
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    names = [n for n, _ in tensor_shapes("olmoe", cfg)]
    assert sorted(index["weight_map"]) == sorted(names)
    assert len(set(index["weight_map"].values())) >= 2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == cfg["eos_token_id"] and tok.token_to_id("<|padding|>") == 1
    assert tok.decode(tok.encode("def f(x): return x").ids) == "def f(x): return x"


def test_published_shape_sizes():
    sizes = {name: sum(torch.Size(s).numel() for _, s in tensor_shapes(sh.arch, _cfg(sh))) for name, sh in SHAPES.items()}
    assert 6.9e9 < sizes["olmoe-1b-7b"] < 6.95e9      # OLMoE-1B-7B: 6.92B
    assert 46.6e9 < sizes["mixtral-8x7b"] < 46.8e9    # Mixtral-8x7B: 46.7B


def _cfg(shape):
    from amoe_serve.bench.synth_checkpoint import _hf_config

    return _hf_config(shape, {})


def test_expert_side_reads_only_owned_experts_and_keeps_bf16(tiny):
    spec = load_spec(tiny)
    owned = [(b, e) for b in range(spec.num_blocks) for e in range(spec.num_experts) if (b + e) % 3 == 0]
    side = ExpertSide.load(tiny, spec, None, owned)
    assert dict(side.reader.reads) == {p: 1 for p in owned}  # each owned expert once, nothing else
    per_expert = 3 * spec.hidden_size * spec.expert_intermediate_size * 2  # bf16 bytes
    assert side.reader.bytes_read == side.bytes_loaded == len(owned) * per_expert
    assert side.weight_dtype == torch.bfloat16


def test_attention_side_never_reads_an_expert_tensor(tiny, monkeypatch):
    from amoe_serve.model.shard_file import ShardFile

    read: list[str] = []
    real_read = ShardFile.read

    def counting(self, name, *a, **kw):
        read.append(name)
        return real_read(self, name, *a, **kw)

    monkeypatch.setattr(ShardFile, "read", counting)
    side = AttentionSide.load(tiny, None, compute_dtype=torch.float32)
    assert read and not [n for n in read if ".experts." in n]
    assert side.qkv_w[0].dtype == torch.bfloat16 and side.dtype == torch.float32  # matrices stay bf16


@pytest.fixture(scope="module")
def hf_greedy(tiny):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                for p in PROMPTS]


@pytest.mark.parametrize("mode", ["aep", "lockstep"])
def test_bf16_at_rest_fp32_compute_equals_transformers_fp32(tiny, hf_greedy, mode):
    """Widening bf16 is exact, so fp32 compute over bf16 weights at rest is transformers'
    float32 run of the same checkpoint, token for token, with 1 attention + 2 expert ranks."""
    cfg = load_config(overrides=[f"model.path={tiny}", f"deployment.mode={mode}", "model.dtype=auto",
                                 "model.compute_dtype=float32", "deployment.attention_ranks=1",
                                 "deployment.expert_ranks=2"])
    reqs = [GenerateRequest(f"r{i}", p, SamplingParams(max_tokens=8, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    res, _ = run_inproc(cfg, reqs, timeout=120)
    assert [res[f"r{i}"].output_token_ids for i in range(len(PROMPTS))] == hf_greedy


def test_compute_dtype_validation():
    from amoe_serve.config import ConfigError

    with pytest.raises(ConfigError, match="compute_dtype"):
        load_config(overrides=["model.compute_dtype=float64"])
    with pytest.raises(ConfigError, match="compute can only be float32"):
        load_config(overrides=["model.dtype=float32", "model.compute_dtype=bfloat16"])


def test_make_checkpoint_cli(tmp_path, capsys):
    from amoe_serve.cli import main

    out = tmp_path / "c"
    assert main(["make-checkpoint", "--shape", "olmoe-tiny", "--output", str(out), "--blocks", "1"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert load_spec(out).num_blocks == 1
    assert main(["make-checkpoint", "--shape", "olmoe-tiny", "--output", str(out)]) != 0  # never overwrites
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["make-checkpoint", "--shape", "olmoe-tiny", "--output", str(tmp_path / "d"), "--blocks", "0"]) != 0
