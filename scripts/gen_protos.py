#!/usr/bin/env python
"""Regenerate the Python gRPC stubs for protos/gradwire/v1/*.proto.

The stubs live as flat modules in the root package ``gradwire/``
(``gradwire.telemetry_pb2`` and ``gradwire.telemetry_pb2_grpc``): the worker and the
server both import them, and neither may import the other. protoc writes
``from gradwire.v1 import telemetry_pb2`` into the ``_grpc`` module; that import is
rewritten to a relative one.

Usage:  python scripts/gen_protos.py            # write into gradwire/
        python scripts/gen_protos.py --out DIR  # write elsewhere (freshness test)

Needs grpcio-tools; the grpcio used at run time must be >= that version.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "gradwire"
# (proto path relative to PROTO_ROOT, module stem written into the output dir)
PROTOS = [("gradwire/v1/telemetry.proto", "telemetry")]


def _fix_imports(text: str) -> str:
    # "from gradwire.v1 import telemetry_pb2 as x"  ->  "from . import telemetry_pb2 as x"
    return re.sub(r"^from gradwire\.v1 import (\w+_pb2) as ", r"from . import \1 as ", text, flags=re.M)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every proto in PROTOS; return the files written to out_dir."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rel, stem in PROTOS:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_ROOT / rel),
            ]
            rc = protoc.main(args)
            if rc != 0:
                raise RuntimeError(f"protoc failed ({rc}) for {rel}")
            gen_dir = Path(tmp) / Path(rel).parent
            for suffix in ("_pb2.py", "_pb2_grpc.py"):
                src = gen_dir / f"{Path(rel).stem}{suffix}"
                dst = out_dir / f"{stem}{suffix}"
                dst.write_text(_fix_imports(src.read_text()))
                written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: gradwire/)")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
