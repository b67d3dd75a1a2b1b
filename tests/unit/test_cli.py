import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gradwire
from gradwire.cli import app, main
from gradwire.cli.extras import MissingExtra, needs

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "digits-powersgd.yaml"


def test_cli_lists_compressors_with_their_parameters():
    result = CliRunner().invoke(app, ["compressors", "powersgd", "--json"])
    assert result.exit_code == 0
    schema = json.loads(result.output)["powersgd"]
    assert schema["properties"]["rank"]["default"] == 2


def test_cli_names_the_available_ones_for_an_unknown_compressor():
    result = CliRunner().invoke(app, ["compressors", "powerSGD"])
    assert result.exit_code == 2
    assert "available: auto, bf16, fp16" in result.output


def test_version(capsys):
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"gradwire {gradwire.__version__}\n"
    main(["--version"])  # the console script answers before it imports typer
    assert capsys.readouterr().out == f"gradwire {gradwire.__version__}\n"


def _without(modules: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the console script's main() in a fresh interpreter where ``modules`` cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {modules!r}:\n    sys.modules[name] = None\n"
        "from gradwire.cli import main\n"
        f"main({list(argv)!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_without_typer_the_entry_point_names_the_cli_extra():
    done = _without(["typer"], "jobs", "list")
    assert done.returncode == 1, done.stderr
    assert "`gradwire` needs `pip install 'gradwire[cli]'`" in done.stderr and "'typer'" in done.stderr
    assert "Traceback" not in done.stderr
    version = _without(["typer", "rich"], "--version")
    assert version.returncode == 0 and version.stdout == f"gradwire {gradwire.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "blocked", "message"),
    [
        (["serve"], "uvicorn", "`gradwire serve` needs `pip install 'gradwire[server]'`"),
        (["train", str(SPEC)], "ray", "`gradwire train` needs `pip install 'gradwire[train]'`"),
        (
            ["plan", str(SPEC), "--bandwidth", "1Gbit"],
            "torch",
            "`gradwire plan` needs `pip install 'gradwire[train]'`",
        ),
        (["submit", str(SPEC)], "httpx", "`gradwire submit` needs `pip install 'gradwire[cli]'`"),
        (["jobs", "list"], "httpx", "`gradwire jobs list` needs `pip install 'gradwire[cli]'`"),
        (["jobs", "logs", "job-0", "-f"], "httpx", "`gradwire jobs logs` needs `pip install 'gradwire[cli]"),
    ],
)
def test_each_command_names_the_extra_it_needs(monkeypatch, argv, blocked, message):
    monkeypatch.setitem(sys.modules, blocked, None)  # find_spec and import both see it missing
    monkeypatch.delitem(sys.modules, "gradwire.cli.remote", raising=False)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert message in result.output and f"'{blocked}'" in result.output
    assert not isinstance(result.exception, ModuleNotFoundError)


def test_needs_names_third_party_modules_only():
    wanted = r"`gradwire x` needs `pip install 'gradwire\[train\]'`"
    with pytest.raises(MissingExtra, match=wanted), needs("gradwire x", "train"):
        raise ModuleNotFoundError("No module named 'ray'", name="ray")
    # a missing gradwire module is a broken install, not a missing extra
    with pytest.raises(ModuleNotFoundError), needs("gradwire x", "train"):
        raise ModuleNotFoundError("No module named 'gradwire.nope'", name="gradwire.nope")
