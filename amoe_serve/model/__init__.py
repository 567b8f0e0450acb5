"""Hugging Face MoE checkpoints split into the halves the ranks hold: AttentionSide (embeddings,
attention, router, shared expert, norms, LM head) and ExpertSide (routed experts)."""

from amoe_serve.model.attention_side import AttentionSide, AttnSegment
from amoe_serve.model.expert_side import ExpertSide
from amoe_serve.model.spec import SUPPORTED_ARCHITECTURES, CheckpointError, ModelSpec, load_spec

__all__ = ["AttentionSide", "AttnSegment", "ExpertSide", "ModelSpec", "CheckpointError", "load_spec",
           "SUPPORTED_ARCHITECTURES"]
