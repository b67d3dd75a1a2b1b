#!/usr/bin/env sh
# Regenerate protos/*_pb2.py and protos/*_pb2_grpc.py (package gradwire.protos) from protos/*.proto
# with the pinned grpcio-tools (see scripts/gen_protos.py; it fetches that wheel once if needed).
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gen_protos.py "$@"
