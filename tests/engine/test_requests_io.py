import json

from amoe_serve.requests_io import GenerateRequest, GenerateResult, read_requests


class ByteTok:
    def encode(self, text):
        return list(text.encode())


def test_malformed_lines_fail_alone_with_their_line_number():
    lines = [
        json.dumps({"id": "a", "prompt_token_ids": [1, 2, 3], "max_tokens": 4}),
        "{not json",
        "",
        json.dumps({"id": "c", "prompt": "hi"}),
        json.dumps({"id": "d", "prompt_token_ids": [1], "max_tokens": 0}),
        json.dumps({"id": "e", "prompt_token_ids": [999]}),
        json.dumps({"id": "f", "prompt": "x", "prompt_token_ids": [1]}),
        json.dumps({"id": "g", "prompt_token_ids": [1], "colour": "red"}),
        json.dumps({"id": "a", "prompt_token_ids": [1]}),
        json.dumps([1, 2]),
    ]
    out = read_requests(lines, ByteTok(), vocab_size=300)
    assert isinstance(out[0], GenerateRequest) and out[0].params.max_tokens == 4
    assert isinstance(out[2], GenerateRequest) and out[2].prompt_token_ids == list(b"hi")
    errors = {e.id: e.error for e in out if isinstance(e, GenerateResult)}
    assert errors["line-2"].startswith("line 2: invalid JSON")
    assert errors["d"].startswith("line 5:") and "max_tokens" in errors["d"]
    assert "outside the vocabulary" in errors["e"]
    assert "exactly one of" in errors["f"]
    assert "colour" in errors["g"]
    assert errors["a"].startswith("line 9: duplicate id")
    assert errors["line-10"].startswith("line 10: expected a JSON object")
    assert len(out) == 9  # the blank line is skipped


def test_prompt_without_tokenizer_is_refused_clearly():
    out = read_requests([json.dumps({"prompt": "hi"})], None, vocab_size=300)
    assert "no tokenizer.json" in out[0].error
