#!/usr/bin/env sh
# Regenerate gradwire/telemetry_pb2.py and gradwire/telemetry_pb2_grpc.py from protos/.
# Uses the project venv when present; needs grpcio-tools (see pyproject dev extra).
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gen_protos.py "$@"
