"""Ray Serve wrapper of the OpenAI app.

Each ingress replica builds its own links to the gateways from plain-data model specs
(`{"name", "path", "host", "port", "token"}`: `path` is the checkpoint folder, for the tokenizer
and chat template), connects them, and serves `openai_app.build_app(...)` through
`@serve.ingress()` with the late-bound `__serve_build_asgi_app__` hook (the FastAPI app needs
the connected links, so it is built inside the replica, not at import time).

Links are made by `link_factory(spec) -> DataPlaneLink`: by default
`amoe_serve.link.client.LinkClient(host, port, token)` (imported lazily in the replica);
tests inject another one, either a picklable callable or a "module:function" string, e.g.
"amoe_serve.serving.fake_link:fake_link_factory".

Usage (the caller owns `ray.init`):

    app = build_serve_app(specs, settings)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(app, name="amoe", route_prefix=settings.route_prefix)

or simply `start_serving(specs, settings)`, which does the last two steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time
from typing import Any, Callable, Optional, Union

from ray import serve

from amoe_serve.serving.settings import ServingConfig
from amoe_serve.default_model import ensure_default_model
from amoe_serve.link.client import LinkClient
from amoe_serve.serving.openai_app import ModelEntry, build_app

log = logging.getLogger(__name__)

LinkFactory = Union[Callable[[dict], Any], str, None]
_SPEC_KEYS = ("name", "path", "host", "port", "token")


def default_link_factory(spec: dict):
    return LinkClient(spec["host"], int(spec["port"]), spec.get("token"))


def _resolve_factory(factory: LinkFactory) -> Callable[[dict], Any]:
    if factory is None:
        return default_link_factory
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        if not module or not attr:
            raise ValueError(f"link_factory {factory!r}: expected 'module:function'")
        return getattr(importlib.import_module(module), attr)
    if not callable(factory):
        raise TypeError(f"link_factory must be callable or a 'module:function' string, got {type(factory).__name__}")
    return factory


def _check_specs(model_specs: list[dict]) -> list[dict]:
    specs, names = [], set()
    for spec in model_specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError(f"model spec {spec!r}: needs a non-empty 'name'")
        if spec["name"] in names:
            raise ValueError(f"model {spec['name']!r} is listed twice")
        names.add(spec["name"])
        specs.append(dict(spec))
    if not specs:
        raise ValueError("no models to serve")
    return specs


async def _connect(link, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.25
    while True:
        try:
            await link.connect()
            return
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise RuntimeError(f"cannot connect the link of model {name!r}: {exc}") from exc
            log.warning("link of %s not ready (%s); retrying in %.1f s", name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def build_entries(model_specs: list[dict], settings: ServingConfig, link_factory: LinkFactory = None):
    """Make, connect and wrap one link per spec: {name: ModelEntry}."""

    factory = _resolve_factory(link_factory)
    entries = {}
    try:
        for spec in _check_specs(model_specs):
            link = factory(spec)
            path = spec.get("path")
            if path is None:  # as in ModelConfig: None is the embedded default model

                path = ensure_default_model()
            entries[spec["name"]] = ModelEntry.from_checkpoint(spec["name"], link, path)
            await _connect(link, spec["name"], settings.connect_timeout_s)
    except BaseException:
        for e in entries.values():
            try:
                await e.link.close()
            except Exception:
                pass
        raise
    return entries


@serve.ingress()
class AmoeIngress:
    """One ingress replica: links to every model's gateway + the OpenAI FastAPI app."""

    async def __init__(self, model_specs: list[dict], settings: dict, link_factory: LinkFactory = None):
        known = {f.name for f in dataclasses.fields(ServingConfig)}
        self._settings = ServingConfig(**{k: v for k, v in settings.items() if k in known})
        self._entries = await build_entries(model_specs, self._settings, link_factory)
        self._app = build_app(self._entries, self._settings)

    def __serve_build_asgi_app__(self):
        return self._app

    async def __del__(self):
        for e in getattr(self, "_entries", {}).values():
            try:
                await e.link.close()
            except Exception:
                pass


def build_serve_app(model_specs: list[dict], settings: Optional[ServingConfig] = None,
                    link_factory: LinkFactory = None,
                    resources: Optional[dict[str, float]] = None) -> serve.Application:
    """The bound Ray Serve application of the ingress (pass it to `serve.run`).

    `link_factory(spec)` makes each model's link (default: LinkClient(host, port, token)); it
    runs inside every replica, so it must be picklable (a module-level function) or a
    "module:function" string. `resources`: Ray custom resources each replica asks for (where
    it may run, e.g. {"amoe_head": 0.001} to keep it on the head node)."""
    settings = settings or ServingConfig()
    specs = _check_specs(model_specs)
    if isinstance(link_factory, str):
        _resolve_factory(link_factory)  # fail early on a bad path
    deployment = serve.deployment(
        AmoeIngress,
        name="amoe-ingress",
        num_replicas=settings.num_replicas,
        # Room above the app's own limit so that the app answers 429 itself instead of Ray
        # queueing: health/metrics/model-list calls also count as ongoing requests.
        max_ongoing_requests=settings.max_concurrent_requests + 64,
        ray_actor_options={"num_cpus": 0, **({"resources": dict(resources)} if resources else {})},
    )
    return deployment.bind(specs, _settings_dict(settings), link_factory)


def _settings_dict(settings) -> dict:
    """Plain dict of a ServingConfig (also an OmegaConf node of one)."""
    if dataclasses.is_dataclass(settings):
        return dataclasses.asdict(settings)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(settings, resolve=True)  # type: ignore[return-value]


def start_serving(model_specs: list[dict], settings: Optional[ServingConfig] = None,
                  link_factory: LinkFactory = None, app_name: str = "amoe", blocking: bool = False):
    """serve.start on settings.host:port, then serve.run the ingress app (ray.init is the caller's)."""
    settings = settings or ServingConfig()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_serve_app(model_specs, settings, link_factory), name=app_name,
                     route_prefix=settings.route_prefix, blocking=blocking)
