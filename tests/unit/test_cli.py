import json

from typer.testing import CliRunner

from gradwire.cli import app


def test_cli_lists_compressors_with_their_parameters():
    result = CliRunner().invoke(app, ["compressors", "powersgd", "--json"])
    assert result.exit_code == 0
    schema = json.loads(result.output)["powersgd"]
    assert schema["properties"]["rank"]["default"] == 2


def test_cli_names_the_available_ones_for_an_unknown_compressor():
    result = CliRunner().invoke(app, ["compressors", "powerSGD"])
    assert result.exit_code == 2
    assert "available: bf16, fp16" in result.output
