"""Compressor registry: name → config model and factory (torch-free).

Built-ins are listed here with lazy factory paths so that looking a name up or
validating a config never imports torch. Third-party packages add compressors
through the entry-point group ``gradwire.compressors``; an entry point must load
to a :class:`CompressorPlugin` (or any object with ``config_model`` and
``build``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from gradwire.compressors.config import BUILTIN_CONFIGS, CompressorConfig

ENTRY_POINT_GROUP = "gradwire.compressors"


class UnknownCompressorError(KeyError):
    """Raised for a compressor name that is neither built in nor installed."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        super().__init__(f"unknown compressor {name!r}; available: {', '.join(available)}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


@dataclass(frozen=True)
class CompressorPlugin:
    """What the registry knows of one compressor.

    ``build(config)`` returns a compressor object (see ``compressors/compressor.py``);
    it is a callable or a ``"module:attr"`` path imported on first use.
    """

    name: str
    config_model: type[CompressorConfig]
    build: Callable[[CompressorConfig], Any] | str

    def factory(self) -> Callable[[CompressorConfig], Any]:
        if callable(self.build):
            return self.build
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)


_BUILTIN_FACTORIES = {
    "none": "gradwire.compressors.dense:build_identity",
    "fp16": "gradwire.compressors.dense:build_fp16",
    "bf16": "gradwire.compressors.dense:build_bf16",
    "powersgd": "gradwire.compressors.powersgd:PowerSGD",
    "topk": "gradwire.compressors.sparse:TopK",
    "randk": "gradwire.compressors.sparse:RandK",
    "qsgd": "gradwire.compressors.quantized:QSGD",
    "sign": "gradwire.compressors.quantized:ScaledSign",
    "auto": "gradwire.compressors.auto:not_a_compressor",
}

_plugins: dict[str, CompressorPlugin] | None = None


def _load() -> dict[str, CompressorPlugin]:
    global _plugins
    if _plugins is None:
        found = {
            name: CompressorPlugin(name, BUILTIN_CONFIGS[name], path)
            for name, path in _BUILTIN_FACTORIES.items()
        }
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in found:
                raise ValueError(
                    f"entry point {ep.value!r} registers compressor {ep.name!r}, "
                    "which is already taken"
                )
            plugin = ep.load()
            found[ep.name] = CompressorPlugin(ep.name, plugin.config_model, plugin.build)
        _plugins = found
    return _plugins


def register(plugin: CompressorPlugin) -> None:
    """Register a compressor in this process (entry points do it for installed packages)."""
    plugins = _load()
    if plugin.name in plugins:
        raise ValueError(f"compressor {plugin.name!r} is already registered")
    plugins[plugin.name] = plugin


def available() -> list[str]:
    """Names of every registered compressor, sorted."""
    return sorted(_load())


def plugin(name: str) -> CompressorPlugin:
    plugins = _load()
    if name not in plugins:
        raise UnknownCompressorError(name, sorted(plugins))
    return plugins[name]


def config_schemas() -> Mapping[str, dict[str, Any]]:
    """JSON schema of every compressor's config (what ``GET /v1/compressors`` serves)."""
    return {name: p.config_model.model_json_schema() for name, p in sorted(_load().items())}


def parse_config(name: str, params: Mapping[str, Any] | None = None) -> CompressorConfig:
    """Validate ``params`` for compressor ``name``.

    Raises :class:`UnknownCompressorError` or pydantic's ``ValidationError``, whose
    entries name each offending field.
    """
    return plugin(name).config_model.model_validate(dict(params or {}))
