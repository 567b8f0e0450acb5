"""Token events are packed into link frames that fit; one oversized answer fails alone."""

import pytest

from amoe_serve.link import wire
from amoe_serve.engine.serve_gateway import frame_events
from amoe_serve.link.messages import Tokens
from amoe_serve.sampler import TokenLogprobs
from amoe_serve.token_events import TokenEvent


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_frames_fit_and_an_oversized_event_fails_alone():
    big = TokenEvent("big", 5, None, None, TokenLogprobs(-1.0, 1, [(7, -1.0)] * 20),
                     [None] + [TokenLogprobs(-2.0, 3, [(i, -0.123456789)] * 20) for i in range(3000)])
    small = [TokenEvent(f"r{i}", i, None, None, TokenLogprobs(-0.5, 1, [(i, -0.5)] * 20))
             for i in range(4000)]
    limit = 64 * 1024
    frames, too_big = frame_events([small[0], big, *small[1:]], limit)
    assert too_big == ["big"]
    flat = [ev for f in frames for ev in f.events]
    assert len(flat) == 4001 and [ev.request_id for ev in flat][:2] == ["r0", "big"]
    assert flat[1].finish_reason == "error" and "logprobs" in flat[1].error
    assert len(frames) > 1
    for f in frames:  # every frame encodes within the limit
        assert len(wire.encode(f.encode())) - 4 <= limit  # body, after the length
    # Plain events go in one frame, unchanged.
    plain = [TokenEvent("a", 1, None), TokenEvent("b", 2, "stop")]
    assert frame_events(plain, wire.MAX_FRAME_BYTES) == ([Tokens(tuple(plain))], [])
