#!/usr/bin/env bash
# Fails when the dashboard's checked-in JavaScript (server/tether_server/web/static/js)
# differs from a fresh compile of clients/dashboard/src, like proto_check.sh does for
# generated code: `make run` serves the checked-in files and needs no Node.
# `make dashboard` rebuilds them.
set -euo pipefail
cd "$(dirname "$0")/../clients/dashboard"
npm ci --no-audit --no-fund --loglevel=error >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npx tsc -p . --outDir "$tmp"
if ! diff -r "$tmp" ../../server/tether_server/web/static/js; then
  echo "dashboard JavaScript is stale: run 'make dashboard' and commit the result" >&2
  exit 1
fi
echo "dashboard-check: OK"
