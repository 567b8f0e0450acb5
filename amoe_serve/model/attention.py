"""Reference causal GQA attention of new tokens over a paged KV context.

One implementation, in `amoe_kernels.reference` beside the Triton paged decode kernel, so the
prefill path here and the decode path through the dispatcher compute bit-identical results.
Query i sits at absolute position start_pos+i and sees keys 0..start_pos+i; returns [n, H*d];
HF eager numerics (scores in activation dtype, softmax in fp32, cast back, then @ V).
"""

from amoe_kernels.reference import gqa_attention as causal_gqa_attention

__all__ = ["causal_gqa_attention"]
