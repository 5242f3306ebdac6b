#!/usr/bin/env bash
# Regenerates the checked-in Python code (pb2, pb2_grpc, mypy-protobuf .pyi) from protos/.
# Usage: scripts/gen_protos.sh [OUT_ROOT]   (default: clients/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-clients/python}
PLUGIN_DIR=$(dirname "$PY")
mkdir -p "$OUT/tether/v1"
"$PY" -m grpc_tools.protoc -Iprotos \
  --plugin=protoc-gen-mypy="$PLUGIN_DIR/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$PLUGIN_DIR/protoc-gen-mypy_grpc" \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  protos/tether/v1/*.proto
# A descriptor set with comments (source info): server reflection serves it, so
# `grpcurl describe` shows every field's documentation.
"$PY" -m grpc_tools.protoc -Iprotos --include_imports --include_source_info \
  --descriptor_set_out="$OUT/tether/v1/descriptor_set.binpb" protos/tether/v1/*.proto
cat > "$OUT/tether/v1/__init__.py" <<'PYEOF'
"""Generated protobuf and gRPC code for the tether.v1 contract. Do not edit: run `make proto`."""
PYEOF
