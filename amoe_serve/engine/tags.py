"""Message kinds (transport tags) of the data plane, between the gateway (rank 0), attention ranks
and expert ranks, with the header each one carries as the code sends it (the ingress<->gateway
link is another protocol: `amoe_serve/link/messages.py`).

Headers are small JSON dicts; bulk data travels as tensors. The control headers (REQUEST,
CANCEL, FATAL) are built and read through the dataclasses of `headers.py`. Rows sent to experts carry
``meta_R3`` = (segment id, token index, top-k slot) as int32 so the reply can be scattered
into the attention rank's token pool without any per-token Python work.
"""

from enum import IntEnum


class Tag(IntEnum):
    REQUEST = 1      # gateway -> attention: {"id", "prompt_token_ids", "params"}
    CANCEL = 2       # gateway -> attention: {"id"}
    TOKENS = 3       # attention -> gateway: {"events": [TokenEvent.to_wire(), ...]}, each
    #                  [id, token, finish_reason, error(, logprobs, prompt_logprobs)] (token_events.py)
    DISPATCH = 4     # attention -> expert: {"b", "seg", "experts", "counts"[, "step"]}; [meta_R3, y_RD]
    COMBINE = 5      # expert -> attention: {"b"[, "segs"][, "step"]}; [meta_R3, out_RD]
    STEP_SYNC = 6    # attention <-> attention (lockstep): {"round", "tokens" (queued here), "stop"}
    SHUTDOWN = 7     # gateway -> all: {}
    STATS = 8        # worker -> gateway: {"rank", "role", RankCounters.to_dict(), "link", ...} at shutdown
    #                  (attention ranks add "trace") and in answer to STATS_REQUEST
    FATAL = 9        # rank -> gateway: {"rank", "role", "error"}
    STATS_REQUEST = 10  # gateway -> worker: {}; answer with a live STATS


GATEWAY_RANK = 0
