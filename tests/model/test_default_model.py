"""Default model: written once, loadable by transformers with identical greedy output; tokenizer round-trips."""

import pytest
import torch

from amoe_serve.default_model import NAME, ensure_default_model, main_make_default
from tests.model.reference import generate_greedy_local
from amoe_serve.model.spec import load_spec
from amoe_serve.tokenizer import Tokenizer

TEXTS = ["", "hello world", "héllo wörld 🙂\n\ttabs  and   spaces", "中文 العربية <b>", "\x00\x7f\u200b"]


@pytest.fixture(scope="module")
def default_path(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("cache"))


def test_written_once(default_path, monkeypatch):
    assert default_path.name == NAME
    mtime = (default_path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(default_path.parent) == default_path
    assert (default_path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in default_path.parent.iterdir()] == [NAME]  # no temp folders left
    monkeypatch.setenv("AMOE_SERVE_CACHE", str(default_path.parent))
    assert ensure_default_model() == default_path
    spec = load_spec(default_path)
    assert (spec.architecture, spec.hidden_size, spec.num_blocks, spec.num_experts, spec.vocab_size) == ("mixtral", 256, 4, 8, 259)


def test_main_make_default_is_deterministic(default_path, tmp_path):
    out = main_make_default(tmp_path / "x")
    assert (out / "model.safetensors").read_bytes() == (default_path / "model.safetensors").read_bytes()


def test_tokenizer_round_trip(default_path, tmp_path):
    tok = Tokenizer.from_dir(default_path)
    assert tok is not None and tok.eos_token_ids == (2,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1  # BOS
        assert tok.decode(ids) == text
    assert tok.encode("A") == [1, 3 + ord("A")]
    assert Tokenizer.from_dir(tmp_path) is None


def test_transformers_loads_and_matches(default_path):
    tf = pytest.importorskip("transformers")
    model = tf.AutoModelForCausalLM.from_pretrained(default_path, dtype=torch.float32, attn_implementation="eager").eval()
    tok = Tokenizer.from_dir(default_path)
    prompts = [tok.encode("The quick brown fox"), tok.encode("é")]
    ours = generate_greedy_local(default_path, prompts, 8, torch.float32)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        assert got == out[0, len(prompt):].tolist()
    hf_tok = tf.AutoTokenizer.from_pretrained(default_path)
    assert hf_tok("hello é").input_ids == tok.encode("hello é")
