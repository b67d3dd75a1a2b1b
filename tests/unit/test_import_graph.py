"""The package's import graph keeps the architecture's shape (docs/architecture.md, "Layers").

Every module of every package that pyproject.toml installs is parsed (with ``ast``; nothing is
imported), and every import in it counts, at module level or inside a function alike:

* **Layers.** Arrows go down only::

      cli  ──▶  server, worker, compressors, contract      (the top floor: the only one that
      server ──▶ contract (+ the compressors' config)        may import the layers together)
      worker ──▶ compressors, contract
      compressors ──▶ nothing else of gradwire
      contract ──▶ nothing else (+ the compressors' config)

  The contract is the root package: ``gradwire`` itself, ``gradwire.spec``, ``gradwire.spec_io``,
  ``gradwire.policy``, ``gradwire.ray_env`` and ``gradwire.protos.*`` (the telemetry stubs). The
  one exception: the contract and the server may import the compressors' torch-free config surface
  (``gradwire.compressors.config`` and ``gradwire.compressors.registry``), so that a JobSpec can
  check its compression section; what those modules import when loaded stays inside that
  surface and never includes torch.
* **Third-party packages by layer**: the compressors never import the other extras' packages
  (Ray, FastAPI, gRPC, typer, ...); the contract outside the stubs never imports torch, Ray, a
  web framework or the CLI's packages; the server never imports torch (it starts training code
  by a Ray job's entrypoint, never by import), and of the server only ``ray_cluster`` imports Ray.
* **No import cycle** between modules (an import that Python resolves lazily, inside a
  function, still counts: the modules still depend on each other).
* **No private names across modules**: ``from x import _name`` and ``module._name`` are refused
  when ``x`` is another gradwire module (dunders such as ``__version__`` are public).

The checks are plain functions over ``{module name: source}``, so the last tests run them on
tiny made-up graphs and show that each one fails where it should.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]

CONTRACT = "contract"
LAYERS = ("cli", "server", "worker", "compressors", CONTRACT)
#: layer -> the layers its modules may import (its own included)
ALLOWED: dict[str, frozenset[str]] = {
    "cli": frozenset({"cli", "server", "worker", "compressors", CONTRACT}),
    "server": frozenset({"server", CONTRACT}),
    "worker": frozenset({"worker", "compressors", CONTRACT}),
    "compressors": frozenset({"compressors"}),
    CONTRACT: frozenset({CONTRACT}),
}
#: the compressors' torch-free modules that the contract and the server may import
CONFIG_SURFACE = frozenset({"gradwire.compressors.config", "gradwire.compressors.registry"})
MAY_USE_CONFIG_SURFACE = frozenset({CONTRACT, "server"})

_OTHER_EXTRAS = (
    "ray", "fastapi", "starlette", "uvicorn", "grpc", "google.protobuf", "sqlalchemy",
    "prometheus_client", "typer", "rich", "yaml", "httpx",
)  # fmt: skip
#: layer -> third-party packages it must never import (the stubs are exempt: they are protobuf)
FORBIDDEN_PACKAGES: dict[str, tuple[str, ...]] = {
    "compressors": _OTHER_EXTRAS,
    CONTRACT: (
        "torch", "ray", "fastapi", "starlette", "uvicorn", "grpc", "sqlalchemy", "typer", "rich", "httpx",
    ),
    "server": ("torch",),
}
STUBS = "gradwire.protos"
#: the one server module that talks to Ray (the rest of the coordinator goes through it)
RAY_GATEWAY = "gradwire.server.ray_cluster"


def layer_of(module: str) -> str:
    for name in ("cli", "server", "worker", "compressors"):
        if module == f"gradwire.{name}" or module.startswith(f"gradwire.{name}."):
            return name
    return CONTRACT


# --- reading the package ------------------------------------------------------------------------


def package_folder(package: str, dirs: Mapping[str, str], root: Path = ROOT) -> Path:
    """Where ``package`` lives: its own ``package-dir`` entry, or its nearest mapped parent's folder."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        mapped = dirs.get(".".join(parts[:i]))
        if mapped is not None:
            return root / mapped / Path(*parts[i:])
    return root / Path(*parts)


def package_sources(root: Path = ROOT) -> dict[str, str]:
    """``{module: source}`` of every module of every package pyproject.toml installs."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs: Mapping[str, str] = setuptools["package-dir"]
    packages: list[str] = setuptools["packages"]

    sources: dict[str, str] = {}
    for package in packages:
        for path in sorted(package_folder(package, dirs, root).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            sources[name] = path.read_text(encoding="utf-8")
    return sources


def unlisted_packages(root: Path = ROOT) -> list[str]:
    """Folders with an ``__init__.py`` below a listed package's folder that pyproject does not list
    (their modules would escape the checks, and the wheel)."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    listed = {(root / d).resolve() for d in dirs.values()}
    listed |= {package_folder(p, dirs, root).resolve() for p in setuptools["packages"]}
    missing = []
    for mapped in setuptools["package-dir"].values():
        for init in (root / mapped).rglob("__init__.py"):
            if init.parent.resolve() not in listed and "__pycache__" not in init.parts:
                missing.append(str(init.parent.relative_to(root)))
    return sorted(set(missing))


# --- the graph ----------------------------------------------------------------------------------


@dataclass
class Graph:
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> internal modules it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> third-party dotted names
    loaded: dict[str, set[str]] = field(default_factory=dict)  # imports run when the module loads
    private: list[str] = field(default_factory=list)  # "module: what it takes"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _base(module: str, is_package: bool, level: int) -> str:
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def _runs_at_load(tree: ast.Module) -> set[int]:
    """ids of the import nodes executed when the module is loaded (not in a function, not under
    ``if TYPE_CHECKING:``)."""
    found: set[int] = set()

    def visit(nodes: Iterable[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.add(id(node))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                for child_field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, child_field, []) or [])

    visit(tree.body)
    return found


def build_graph(sources: Mapping[str, str]) -> Graph:
    modules = set(sources)
    packages = {m for m in modules if any(other.startswith(m + ".") for other in modules)}
    graph = Graph()
    for module, source in sources.items():
        tree = ast.parse(source)
        at_load = _runs_at_load(tree)
        edges, external, loaded = set(), set(), set()
        aliases: dict[str, str] = {}  # local name -> internal module it stands for

        def target(
            name: str, node: ast.stmt, edges=edges, external=external, loaded=loaded, at_load=at_load
        ) -> None:
            if name == "gradwire" or name.startswith("gradwire."):
                edges.add(name)
            else:
                external.add(name)
            if id(node) in at_load:
                loaded.add(name)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target(alias.name, node)
                    if alias.name in modules:
                        aliases[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else alias.name.split(".")[0]
                        )
            elif isinstance(node, ast.ImportFrom):
                source_module = node.module or ""
                if node.level:
                    base = _base(module, module in packages, node.level)
                    source_module = f"{base}.{source_module}" if source_module else base
                for alias in node.names:
                    sub = f"{source_module}.{alias.name}"
                    if sub in modules:
                        target(sub, node)
                        aliases[alias.asname or alias.name] = sub
                        continue
                    target(source_module, node)
                    internal = source_module in modules
                    if internal and source_module != module and _is_private(alias.name):
                        graph.private.append(f"{module}: from {source_module} import {alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner = _dotted(node.value, aliases)
                if owner in modules and owner != module:
                    graph.private.append(f"{module}: {owner}.{node.attr}")
        edges.discard(module)
        graph.edges[module] = {e for e in edges if e in modules}
        unknown = {e for e in edges if e not in modules}
        assert not unknown, f"{module} imports gradwire modules that do not exist: {sorted(unknown)}"
        graph.external[module] = external
        graph.loaded[module] = loaded
    return graph


def _dotted(node: ast.expr, aliases: Mapping[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _dotted(node.value, aliases)
        return f"{owner}.{node.attr}" if owner else None
    return None


# --- the rules ----------------------------------------------------------------------------------


def forbidden_arrows(graph: Graph) -> list[str]:
    found = []
    for module, targets in sorted(graph.edges.items()):
        here = layer_of(module)
        for other in sorted(targets):
            there = layer_of(other)
            if there in ALLOWED[here]:
                continue
            if other in CONFIG_SURFACE and here in MAY_USE_CONFIG_SURFACE:
                continue
            found.append(f"{module} ({here}) -> {other} ({there})")
    return found


def config_surface_problems(graph: Graph) -> list[str]:
    """What the config surface runs when it loads must be torch-free and stay inside it (the
    package's ``__init__`` included: Python runs it before any of its modules)."""
    surface = CONFIG_SURFACE | {"gradwire.compressors"}
    found = []
    for module in sorted(surface & set(graph.loaded)):
        for name in sorted(graph.loaded[module]):
            if name == "torch" or name.startswith("torch."):
                found.append(f"{module} imports {name} when it loads")
            internal = name == "gradwire" or name.startswith("gradwire.")
            if internal and name not in surface:
                found.append(f"{module} loads {name}, outside the torch-free config surface")
    return found


def forbidden_packages(graph: Graph) -> list[str]:
    found = []
    for module, names in sorted(graph.external.items()):
        if module == STUBS or module.startswith(STUBS + "."):
            continue
        for banned in FORBIDDEN_PACKAGES.get(layer_of(module), ()):
            for name in sorted(names):
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{module} ({layer_of(module)}) imports {name}")
    return found


def ray_outside_the_gateway(graph: Graph) -> list[str]:
    return [
        f"{module} imports {name}"
        for module, names in sorted(graph.external.items())
        if layer_of(module) == "server" and module != RAY_GATEWAY
        for name in sorted(names)
        if name == "ray" or name.startswith("ray.")
    ]


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph.edges):
        if v not in index:
            visit(v)
    return sorted(found)


# --- the package as it is -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(package_sources())


def test_every_layer_and_package_is_checked(graph: Graph):
    assert unlisted_packages() == []
    layers = {layer_of(m) for m in graph.edges}
    assert layers == set(LAYERS)
    for module in ("gradwire", "gradwire.spec", "gradwire.spec_io", "gradwire.protos.telemetry_pb2",
                   "gradwire.cli", "gradwire.cli.commands", "gradwire.server.scheduler",
                   "gradwire.worker.runtime", "gradwire.compressors.coding.coded_round"):  # fmt: skip
        assert module in graph.edges


def test_the_root_package_is_only_the_contract(graph: Graph):
    root = sorted(m for m in graph.edges if layer_of(m) == CONTRACT)
    assert root == [
        "gradwire", "gradwire.policy", "gradwire.protos", "gradwire.protos.telemetry_pb2",
        "gradwire.protos.telemetry_pb2_grpc", "gradwire.ray_env", "gradwire.spec", "gradwire.spec_io",
    ]  # fmt: skip


def test_arrows_go_down_only(graph: Graph):
    assert forbidden_arrows(graph) == []


def test_nothing_below_the_top_floor_imports_it(graph: Graph):
    users = {m for m, targets in graph.edges.items() for t in targets if layer_of(t) == "cli"}
    assert {layer_of(m) for m in users} <= {"cli"}


def test_the_config_surface_loads_without_torch(graph: Graph):
    assert config_surface_problems(graph) == []


def test_layers_keep_to_their_own_third_party_packages(graph: Graph):
    assert forbidden_packages(graph) == []


def test_the_server_reaches_ray_through_one_module(graph: Graph):
    assert "ray" in {n.split(".")[0] for n in graph.external[RAY_GATEWAY]}
    assert ray_outside_the_gateway(graph) == []


def test_there_is_no_import_cycle(graph: Graph):
    assert cycles(graph) == []


def test_no_module_takes_another_modules_private_names(graph: Graph):
    assert graph.private == []


# --- the checks fail where they should ----------------------------------------------------------


def test_relative_imports_resolve_to_the_right_module():
    g = build_graph({
        "gradwire.protos": "",
        "gradwire.protos.a_pb2": "",
        "gradwire.protos.a_pb2_grpc": "from . import a_pb2 as x\n",
    })  # fmt: skip
    assert g.edges["gradwire.protos.a_pb2_grpc"] == {"gradwire.protos.a_pb2"}


def test_a_forbidden_arrow_is_found():
    g = build_graph({
        "gradwire": "",
        "gradwire.spec": "def load():\n    from gradwire.server import app\n",  # lazy still counts
        "gradwire.server": "",
        "gradwire.server.app": "from gradwire.cli import main\n",
        "gradwire.cli": "def main():\n    pass\n",
        "gradwire.compressors": "",
        "gradwire.compressors.reducer": "import gradwire.worker.steps\n",
        "gradwire.compressors.config": "",
        "gradwire.worker": "",
        "gradwire.worker.steps": (
            "from gradwire.compressors.config import X\nfrom gradwire.server import app\n"
        ),
    })  # fmt: skip
    assert forbidden_arrows(g) == [
        "gradwire.compressors.reducer (compressors) -> gradwire.worker.steps (worker)",
        "gradwire.server.app (server) -> gradwire.cli (cli)",
        "gradwire.spec (contract) -> gradwire.server.app (server)",
        "gradwire.worker.steps (worker) -> gradwire.server.app (server)",
    ]


def test_the_config_exception_is_only_the_config_surface():
    g = build_graph({
        "gradwire.spec": (
            "from gradwire.compressors.config import C\nfrom gradwire.compressors.reducer import R\n"
        ),
        "gradwire.compressors": "from gradwire.compressors.registry import R\nimport numpy\n",
        "gradwire.compressors.config": "import torch\n",
        "gradwire.compressors.registry": "from gradwire.compressors.hook import H\n",
        "gradwire.compressors.reducer": "",
        "gradwire.compressors.hook": "",
    })  # fmt: skip
    assert forbidden_arrows(g) == ["gradwire.spec (contract) -> gradwire.compressors.reducer (compressors)"]
    assert config_surface_problems(g) == [
        "gradwire.compressors.config imports torch when it loads",
        "gradwire.compressors.registry loads gradwire.compressors.hook, "
        "outside the torch-free config surface",
    ]


def test_a_lazy_or_type_only_import_does_not_load_with_the_module():
    g = build_graph({
        "gradwire.compressors.config": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
            "def make():\n    import torch\n"
        ),
    })  # fmt: skip
    assert g.loaded["gradwire.compressors.config"] == {"typing"}
    assert config_surface_problems(g) == []


def test_a_forbidden_package_is_found():
    g = build_graph({
        "gradwire.compressors.sparse": "import numpy\ndef f():\n    import ray.train\n",
        "gradwire.spec_io": "import yaml\nimport torch\n",
        "gradwire.protos.x_pb2": "from google.protobuf import descriptor\n",
        "gradwire.server.app": "import fastapi\nfrom torch import nn\n",
    })  # fmt: skip
    assert forbidden_packages(g) == [
        "gradwire.compressors.sparse (compressors) imports ray.train",
        "gradwire.server.app (server) imports torch",
        "gradwire.spec_io (contract) imports torch",
    ]


def test_ray_outside_the_gateway_is_found():
    g = build_graph({
        "gradwire.server.ray_cluster": "import ray\n",
        "gradwire.server.scheduler": "def f():\n    from ray.job_submission import JobSubmissionClient\n",
        "gradwire.worker.launch": "import ray\n",
    })  # fmt: skip
    assert ray_outside_the_gateway(g) == ["gradwire.server.scheduler imports ray.job_submission"]


def test_a_cycle_is_found_even_through_a_lazy_import():
    g = build_graph({
        "gradwire.spec": "from gradwire.spec_io import SpecError\n",
        "gradwire.spec_io": "def f():\n    from gradwire.spec import JobSpec\n",
        "gradwire.ray_env": "import gradwire.spec\n",
        "gradwire.server.a": "from gradwire.server import b\n",
        "gradwire.server.b": "from gradwire.server.c import x\n",
        "gradwire.server.c": "import gradwire.server.a as a\n",
        "gradwire.server": "",
    })  # fmt: skip
    assert cycles(g) == [
        ["gradwire.server.a", "gradwire.server.b", "gradwire.server.c"],
        ["gradwire.spec", "gradwire.spec_io"],
    ]


def test_private_names_of_another_module_are_found():
    g = build_graph({
        "gradwire": "__version__ = '1'\n",
        "gradwire.server.ray_jobs": "_EPS = 1\ndef _tail():\n    return _EPS\n",
        "gradwire.server.scheduler": (
            "from gradwire import __version__\n"  # a dunder is public
            "from gradwire.server.ray_jobs import _EPS, submission_id\n"
        ),
        "gradwire.server.demand": "import gradwire.server.ray_jobs as rj\nx = rj._tail()\n",
        "gradwire.server.other": "from gradwire.server import ray_jobs\ny = ray_jobs._EPS\n",
        "gradwire.server.fine": "import gradwire.server.ray_jobs as rj\nz = rj.submission_id\n",
        "gradwire.server": "",
    })  # fmt: skip
    assert sorted(g.private) == [
        "gradwire.server.demand: gradwire.server.ray_jobs._tail",
        "gradwire.server.other: gradwire.server.ray_jobs._EPS",
        "gradwire.server.scheduler: from gradwire.server.ray_jobs import _EPS",
    ]
