"""Settings of the HTTP ingress; the schema lives with the other configs in `amoe_serve.config`."""

import socket

from amoe_serve.config import ExtraModel, ServingConfig, validate_serving

__all__ = ["ExtraModel", "ServingConfig", "validate_serving", "endpoint_url", "WILDCARD_HOSTS"]

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def endpoint_url(host: str, port: int, route_prefix: str = "/") -> str:
    """The OpenAI base URL of an ingress listening on host:port under serving.route_prefix
    (`http://HOST:PORT[/PREFIX]/v1`); a wildcard host becomes this node's name. What `up` and
    `ingress` print, and where clients and health checks (PREFIX/health) go."""
    if host in WILDCARD_HOSTS:
        host = socket.getfqdn()
        if host.startswith("localhost"):  # /etc/hosts lists the node's address as localhost first
            host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{route_prefix.rstrip('/')}/v1"
