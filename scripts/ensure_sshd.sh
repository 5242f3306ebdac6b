#!/usr/bin/env bash
# Installs Debian's openssh-server (sshd) and iproute2 when they are missing: the
# multi-host tests (tests/hosts/) start a real sshd inside network + PID namespaces
# and let ipyparallel's SSH launcher place engines there. The distribution's own
# service is not enabled or started: the tests run sshd themselves, per host, with a
# throw-away configuration. Needs root (CI runs as root; so do the namespace tests).
set -euo pipefail
if [ -x /usr/sbin/sshd ] && command -v ip >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure_sshd: sshd/ip missing; run as root: apt-get install -y openssh-server iproute2" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Keep the package's service off: policy-rc.d tells invoke-rc.d not to start it.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  made_policy=1
fi
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends openssh-server openssh-client iproute2 util-linux >/dev/null
if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
echo "ensure_sshd: installed $(/usr/sbin/sshd -V 2>&1 | head -1)"
