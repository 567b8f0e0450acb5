"""Settings of the HTTP ingress; the schema lives with the other configs in `amoe_serve.config`."""

from amoe_serve.config import ExtraModel, ServingConfig, validate_serving

__all__ = ["ExtraModel", "ServingConfig", "validate_serving"]
