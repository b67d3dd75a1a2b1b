"""Registry: names, schemas, torch-free configs and third-party entry points."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import gradwire.compressors.registry as registry
from gradwire.compressors import available, config_schemas, make_reducer

BUILTINS = ["bf16", "fp16", "none", "powersgd", "qsgd", "randk", "sign", "topk"]


def test_builtins_are_available():
    assert [n for n in available() if n in BUILTINS] == BUILTINS


def test_every_config_has_a_json_schema_with_its_fields():
    schemas = config_schemas()
    assert schemas["powersgd"]["properties"]["rank"]["minimum"] == 1
    assert "ratio" in schemas["topk"]["properties"]
    assert schemas["topk"]["additionalProperties"] is False
    for name in BUILTINS:
        assert "feedback" in schemas[name]["properties"]


def test_configs_validate_without_importing_torch():
    code = textwrap.dedent(
        """
        import sys
        from gradwire.compressors import parse_config, available
        parse_config("topk", {"ratio": 0.05, "feedback": "econtrol", "eta": 0.2})
        assert "powersgd" in available()
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


PLUGIN_MODULE = textwrap.dedent(
    """
    import torch
    from gradwire.compressors import CompressorPlugin
    from gradwire.compressors.config import CompressorConfig
    from gradwire.compressors.dense import Cast

    class HalfConfig(CompressorConfig):
        pass

    def build(config):
        return Cast("halfplugin", torch.float16)

    PLUGIN = CompressorPlugin("halfplugin", HalfConfig, build)
    """
)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real distribution on sys.path that declares an entry point in our group."""
    (tmp_path / "halfplugin_pkg.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "halfplugin_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: halfplugin-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gradwire.compressors]\nhalfplugin = halfplugin_pkg:PLUGIN\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins", None)
    yield
    registry._plugins = None


def test_entry_point_plugin_is_found_and_usable(installed_plugin):
    assert "halfplugin" in available()
    assert "halfplugin" in config_schemas()
    reducer = make_reducer("halfplugin", min_compression_rate=0)
    x = torch.randn(8, 8)
    out = reducer.reduce([x])[0]
    torch.testing.assert_close(out, x.half().float())
    assert reducer.stats()["bytes_sent"] == 2 * 64
