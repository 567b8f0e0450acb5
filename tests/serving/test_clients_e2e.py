"""Clients nobody here wrote, against the real stack (`amoe-serve up` -> mpiexec -> Ray Serve):
the openai SDK with the vLLM-parity parameters, logprobs over HTTP against transformers, and
lm-evaluation-harness's `local-completions` model against its own `hf` model on the checkpoint."""

import json
import math
import shutil
import textwrap

import pytest
import torch

from amoe_serve.default_model import ensure_default_model
from amoe_serve.serving.attach import free_port
from tests.model.hf_factory import load_hf
from tests.serving.stack import up_stack
from tests.support import PROMPTS, REPO, run_group

pytestmark = [pytest.mark.mpi(ranks=4), pytest.mark.slow, pytest.mark.ray]
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    # The mixtral checkpoint with the default model's byte-level tokenizer (ids < 259 fit its
    # vocab of 300): text prompts, chat and grammars work, and transformers loads the same folder.
    mix = tmp / "mixtral"
    shutil.copytree(checkpoints["mixtral"], mix)
    default = ensure_default_model(tmp / "cache")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default / f, mix / f)
    port = free_port()
    cfg = {"model": {"path": str(mix)}, "deployment": {"mode": "aep", "attention_ranks": 1, "expert_ranks": 2},
           "link": {"model_name": "mix"},
           "serving": {"port": port, "max_concurrent_requests": 64, "max_tokens_limit": 256}}
    with up_stack(tmp, cfg, 60) as running:
        running["path"] = mix
        yield running


def _client(served):
    return openai.OpenAI(base_url=f"{served['base']}/v1", api_key="none", timeout=120, max_retries=0)


def test_openai_sdk_completions_parameters(served):
    c = _client(served)
    r = c.completions.create(model="mix", prompt=["Hello", "Bye"], n=2, max_tokens=4, temperature=0.9, seed=11,
                             logprobs=2, echo=True, presence_penalty=0.5, frequency_penalty=0.3,
                             extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.text.startswith(("Hello", "Bye")) for ch in r.choices)
    for ch in r.choices:
        lp = ch.logprobs
        assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
        assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    again = c.completions.create(model="mix", prompt=["Hello", "Bye"], n=2, max_tokens=4, temperature=0.9, seed=11,
                                 logprobs=2, echo=True, presence_penalty=0.5, frequency_penalty=0.3,
                                 extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2})
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # seeded: reproducible
    assert r.usage.completion_tokens == sum(len(ch.model_extra["token_ids"]) for ch in r.choices)

    # Streaming with n and usage.
    seen: dict[int, list] = {}
    usage = None
    for ev in c.completions.create(model="mix", prompt="Hi", n=3, max_tokens=5, temperature=1.0, seed=2, stream=True,
                                   stream_options={"include_usage": True}):
        if ev.usage is not None:
            usage = ev.usage
        for ch in ev.choices:
            seen.setdefault(ch.index, []).append(ch.finish_reason)
    assert sorted(seen) == [0, 1, 2] and all(v[-1] in ("length", "stop") for v in seen.values())
    assert usage is not None and usage.completion_tokens <= 15

    # Unsupported parameters are refused by name, not ignored.
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="mix", prompt="Hi", max_tokens=2, best_of=2)
    assert "best_of" in str(e.value)


def test_openai_sdk_chat_logprobs_and_structured_output(served):
    c = _client(served)
    r = c.chat.completions.create(model="mix", messages=[{"role": "user", "content": "Pick a colour"}],
                                  max_completion_tokens=3, logprobs=True, top_logprobs=3, n=2, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content  # greedy
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy = the top token

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "boolean"}},
              "required": ["colour", "n"], "additionalProperties": False}
    r = c.chat.completions.create(model="mix", messages=[{"role": "user", "content": "JSON please"}],
                                  max_completion_tokens=60, temperature=0,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "c", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert obj["colour"] in ("red", "green") and isinstance(obj["n"], bool)
    r = c.completions.create(model="mix", prompt="Answer:", max_tokens=10, temperature=0,
                             extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"


def test_http_logprobs_equal_transformers(served):
    c = _client(served)
    model = load_hf(served["path"], torch.float32)
    for prompt in PROMPTS[:3]:
        r = c.completions.create(model="mix", prompt=prompt, max_tokens=4, temperature=0, logprobs=0, echo=True)
        ch = r.choices[0]
        seq = prompt + ch.model_extra["token_ids"]
        with torch.no_grad():
            lp_LV = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
        want = [None] + [lp_LV[j - 1, seq[j]].item() for j in range(1, len(seq))]
        got = ch.logprobs.token_logprobs
        assert len(got) == len(want) and got[0] is None
        assert max(abs(a - b) for a, b in zip(got[1:], want[1:])) < 1e-4


def _write_tasks(root):
    data = root / "data"
    data.mkdir()
    mc = [{"q": f"Question {i}: which?", "choices": ["alpha", "beta", "gamma"], "label": i % 3} for i in range(6)]
    (data / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    gen = [{"q": f"Say something {i}:", "a": "x"} for i in range(3)]
    (data / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    (root / "amoe_mc.yaml").write_text(textwrap.dedent(f"""\
        task: amoe_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """))
    (root / "amoe_gen.yaml").write_text(textwrap.dedent(f"""\
        task: amoe_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data / 'gen.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{q}}}}"
        doc_to_target: "{{{{a}}}}"
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
        """))


def test_lm_eval_local_completions_agrees_with_its_hf_model(served, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _write_tasks(tmp_path)
    tm = TaskManager(include_path=str(tmp_path))
    path = served["path"]

    def run(model, args):
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["amoe_mc", "amoe_gen"], task_manager=tm,
                                      log_samples=True, batch_size=1)
        return {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in ("amoe_mc", "amoe_gen")}

    ours = run("local-completions", f"model=mix,base_url={served['base']}/v1/completions,tokenizer={path},"
                                    f"tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,add_bos_token=True")
    # The same token ids on both sides: lm-eval's API models and its hf model differ in their BOS default.
    ref = run("hf", f"pretrained={path},dtype=float32,device=cpu,add_bos_token=True")
    for a, b in zip(ours["amoe_mc"], ref["amoe_mc"]):
        la = [float(r[0]) for r in a["filtered_resps"]]
        lb = [float(r[0]) for r in b["filtered_resps"]]
        assert all(math.isfinite(x) for x in la)
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-3, (la, lb)
    assert [s["filtered_resps"] for s in ours["amoe_gen"]] == [s["filtered_resps"] for s in ref["amoe_gen"]]


VLLM_VENV = REPO / ".venv-vllm"


@pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").exists(),
                    reason="vLLM's venv is not installed (scripts/install-vllm.sh)")
@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_vllm_bench_serve_completes_with_no_failures(served, tmp_path, backend):
    """vLLM's own serving benchmark client, as documented in docs/api.md."""
    args = ["bash", str(REPO / "scripts" / "vllm-bench-serve.sh"), "--backend", backend, "--base-url", served["base"],
            "--model", "mix", "--tokenizer", str(served["path"]), "--dataset-name", "random",
            "--random-input-len", "16", "--random-output-len", "8", "--num-prompts", "12", "--request-rate", "4",
            "--ignore-eos", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    if backend == "openai-chat":
        args += ["--endpoint", "/v1/chat/completions"]
    p = run_group(args, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["completed"] == 12 and res["failed"] == 0 and res["total_output_tokens"] == 12 * 8
