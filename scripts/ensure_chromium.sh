#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver when they are missing: the browser
# tests (tests/e2e/test_dashboard_browser.py) drive the system Chromium through
# Selenium and never download a browser of their own. Needs root (CI runs as root).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure_chromium: chromium/chromium-driver missing; run as root: apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "ensure_chromium: installed $(chromium --version)"
