#!/usr/bin/env python
"""Regenerate the Python gRPC stubs of protos/*.proto into protos/ (package ``gradwire.protos``).

Each ``protos/NAME.proto`` becomes ``protos/NAME_pb2.py`` and ``protos/NAME_pb2_grpc.py``. The
proto is compiled as ``gradwire/protos/NAME.proto`` so that the stubs name their own package
(``from gradwire.protos import NAME_pb2``) and the descriptor's file name cannot clash with
another library's ``NAME.proto`` in protobuf's global pool.

The stubs record the versions that made them, and refuse older runtimes: the ``_pb2`` module
needs ``protobuf >= `` the protoc version bundled with grpcio-tools, the ``_grpc`` module needs
``grpcio >= `` the grpcio-tools version. So the generator is pinned (``GRPCIO_TOOLS``) to an old
enough release that users are not forced onto the newest protobuf: grpcio-tools 1.72.2 bundles
protoc 6.30.0, so the stubs run on protobuf >= 6.30.0 and grpcio >= 1.72.2. That release
itself wants protobuf < 7, so it is not installed next to the project; the script uses an
installed grpcio-tools only when it is exactly the pinned version, and otherwise installs the
pinned wheel (without its dependencies: protoc needs none) into ``.gradwire/tools/`` once.

Usage:  python scripts/gen_protos.py            # write into protos/
        python scripts/gen_protos.py --out DIR  # write elsewhere (freshness test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
DEFAULT_OUT = PROTO_DIR
#: the Python package the stubs belong to, as a path (compiled as PACKAGE_PATH/NAME.proto)
PACKAGE_PATH = Path("gradwire") / "protos"
#: grpcio-tools release that generates the committed stubs (protoc 6.30.0 inside)
GRPCIO_TOOLS = "1.72.2"
TOOLS_DIR = ROOT / ".gradwire" / "tools" / f"grpcio-tools-{GRPCIO_TOOLS}"

_PROTOC = """
import sys
from importlib import resources
from grpc_tools import protoc
include = str(resources.files("grpc_tools") / "_proto")
sys.exit(protoc.main(["grpc_tools.protoc", f"-I{include}", *sys.argv[1:]]))
"""


def tools_path() -> str | None:
    """Where the pinned grpcio-tools lives: ``None`` when the running interpreter has it
    installed, else a folder for PYTHONPATH (installed there on first use)."""
    try:
        if metadata.version("grpcio-tools") == GRPCIO_TOOLS:
            return None
    except metadata.PackageNotFoundError:
        pass
    if not (TOOLS_DIR / "grpc_tools").is_dir():
        partial = TOOLS_DIR.with_name(TOOLS_DIR.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial),
             f"grpcio-tools=={GRPCIO_TOOLS}"],
            check=True,
        )  # fmt: skip
        partial.rename(TOOLS_DIR)
    return str(TOOLS_DIR)


def generate(out_dir: Path) -> list[Path]:
    """Compile every protos/*.proto with the pinned grpcio-tools; return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    extra = tools_path()
    if extra is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        src, gen = Path(tmp) / "src", Path(tmp) / "gen"
        (src / PACKAGE_PATH).mkdir(parents=True)
        gen.mkdir()
        protos = sorted(PROTO_DIR.glob("*.proto"))
        if not protos:
            raise RuntimeError(f"no .proto files in {PROTO_DIR}")
        for proto in protos:
            shutil.copyfile(proto, src / PACKAGE_PATH / proto.name)
            rel = (PACKAGE_PATH / proto.name).as_posix()
            args = [f"-I{src}", f"--python_out={gen}", f"--grpc_python_out={gen}", rel]
            done = subprocess.run([sys.executable, "-c", _PROTOC, *args], cwd=src, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"protoc failed ({done.returncode}) for {proto.name}")
            for suffix in ("_pb2.py", "_pb2_grpc.py"):
                made = gen / PACKAGE_PATH / f"{proto.stem}{suffix}"
                dst = out_dir / made.name
                dst.write_bytes(made.read_bytes())
                written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: protos/)")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
