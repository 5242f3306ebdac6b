#!/usr/bin/env bash
# Fails when the checked-in generated code differs from a fresh generation, when
# buf lint finds anything, or when the protos break compatibility with main.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.venv/bin/buf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/gen_protos.sh "$tmp" >/dev/null 2>&1
if ! diff -r -q "$tmp/tether/v1" clients/python/tether/v1 -x __pycache__; then
  echo "generated code is stale: run 'make proto' and commit the result" >&2
  exit 1
fi
(cd protos && ../$BUF lint)
if git rev-parse --verify -q main >/dev/null && git cat-file -e main:protos/buf.yaml 2>/dev/null; then
  (cd protos && ../$BUF breaking --against '../.git#branch=main,subdir=protos')
else
  echo "buf breaking: no protos on main yet, skipped"
fi
echo "proto-check: OK"
