#!/usr/bin/env bash
# Fails when src/gen is stale: regenerates into a temporary directory with the
# same buf.gen.yaml and compares it with the checked-in files.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
npx --no-install buf generate --output "$tmp"
if ! diff -ru src/gen "$tmp/src/gen"; then
  echo "src/gen is stale: run 'npm run gen' in clients/typescript and commit the result" >&2
  exit 1
fi
echo "src/gen is up to date"
