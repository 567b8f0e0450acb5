"""Checkpoint check before anything starts: used by the CLI and the ingress's attach mode."""

from __future__ import annotations

from amoe_serve.model.attention_side import required_weight_names
from amoe_serve.model.checkpoint import check_checkpoint
from amoe_serve.model.spec import ModelSpec, load_spec


def check_model(path: str) -> ModelSpec:
    """A bad checkpoint fails here, in one line (CheckpointError), before any rank starts."""
    spec = load_spec(path)
    check_checkpoint(path, spec, required_weight_names(spec))
    return spec
