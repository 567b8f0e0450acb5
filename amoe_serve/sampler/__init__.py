"""Sampling: parameters, logit processing, the sampler, logprobs and grammar masks."""
from amoe_serve.sampler.logprobs import TokenLogprobs, prompt_logprobs, token_logprobs
from amoe_serve.sampler.params import MAX_LOGPROBS, SamplingParams, StructuredSpec
from amoe_serve.sampler.sample import Sampler, finish_reason, make_generator
from amoe_serve.sampler.state import RowState

__all__ = ["MAX_LOGPROBS", "RowState", "Sampler", "SamplingParams", "StructuredSpec", "TokenLogprobs",
           "finish_reason", "make_generator", "prompt_logprobs", "token_logprobs"]
