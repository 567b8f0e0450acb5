"""Typed control headers of the data plane: round trips and clear errors on malformed ones."""

import pytest

from amoe_serve.engine.headers import CancelHeader, FatalHeader, HeaderError, RequestHeader


def test_round_trips():
    for h in (RequestHeader("r1", [1, 2, 3], {"max_tokens": 4}), CancelHeader("r1"), FatalHeader(3, "expert", "boom")):
        assert type(h).decode(h.encode()) == h
    assert FatalHeader(3, "expert", "boom").describe() == "rank 3 (expert) failed: boom"


@pytest.mark.parametrize("cls,header,field", [
    (RequestHeader, {"prompt_token_ids": [1], "params": {}}, "id"),
    (RequestHeader, {"id": "r", "prompt_token_ids": "1 2", "params": {}}, "prompt_token_ids"),
    (RequestHeader, {"id": "r", "prompt_token_ids": [1], "params": None}, "params"),
    (CancelHeader, {"id": 7}, "id"),
    (FatalHeader, {"rank": True, "role": "expert", "error": "x"}, "rank"),
])
def test_malformed_headers_name_the_field(cls, header, field):
    with pytest.raises(HeaderError, match=repr(field)):
        cls.decode(header)
