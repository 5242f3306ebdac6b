#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine lacks, for bench/gpu_check.py.
#
# The GPU machine (see the device tool's KINDS.md) has Python 3.12 with torch, psutil,
# rich, tqdm, packaging, pygments, python-dateutil, typing-extensions... but not
# ipyparallel and its dependency closure, and its grpcio/protobuf may be older than what
# our generated code (clients/python/tether/v1) checks for at import. So we carry:
#   - ipyparallel and every package of its closure that is not in KINDS.md's list;
#   - grpcio, grpcio-status, grpcio-health-checking, grpcio-reflection, protobuf,
#     googleapis-common-protos and typing-extensions at our venv's versions.
# Versions come from `.venv/bin/pip freeze` when the venv is there, else from the pins
# below (the venv's versions when this was written). One version of each, --no-deps,
# cp312 manylinux x86_64, as the device README's recipe says.
#
# Usage: scripts/gpu_wheels.sh            # (re)fill .whl/
#        scripts/gpu_wheels.sh --verify   # then check the set with a throwaway Python 3.12
#
# On the device:  python3 -m pip install -q --no-index --no-deps --no-compile \
#   --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:...
# (`python3 bench/gpu_check.py --print-device-command` prints the whole command line.)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=.whl
PY=${PYTHON:-python3}

# name==fallback-version; the venv's version wins when the venv has the package.
PINS=(
  # ipyparallel and its closure (not on the GPU machine)
  ipyparallel==9.2.0
  ipykernel==7.4.0
  ipython==9.18.1
  ipython_pygments_lexers==1.1.1
  jupyter_client==8.10.0
  jupyter_core==5.9.1
  pyzmq==27.3.0
  tornado==6.6.1
  traitlets==5.16.1
  comm==0.2.3
  debugpy==1.8.22
  decorator==5.3.1
  jedi==0.20.1
  parso==0.8.7
  matplotlib-inline==0.2.2
  prompt_toolkit==3.0.53
  wcwidth==0.9.4
  pexpect==4.9.0
  ptyprocess==0.7.0
  stack_data==0.6.3
  asttokens==3.0.2
  executing==2.3.0
  pure_eval==0.2.4
  nest-asyncio2==1.7.4
  platformdirs==4.14.8
  # there, maybe at other versions: the generated code checks grpc and protobuf
  grpcio==1.85.3
  grpcio-status==1.85.3
  grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1
  protobuf==7.36.2
  googleapis-common-protos==1.76.0
  typing_extensions==4.16.0
)

# This machine's pip also looks at local mirrors, and warns for each name they lack.
quiet() { "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2); }

norm() { tr 'A-Z_.' 'a-z--' <<<"$1"; }

declare -A VENV_VERSION=()
if [[ -x .venv/bin/pip ]]; then
  while IFS='=' read -r name _ version; do
    [[ -n "$name" && -n "$version" && "$name" != -e* && "$name" != \#* ]] || continue
    VENV_VERSION[$(norm "$name")]=${version%%+*}
  done < <(.venv/bin/pip freeze 2>/dev/null | grep '==')
fi

REQS=()
for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  version=${VENV_VERSION[$(norm "$name")]:-${pin##*==}}
  REQS+=("$name==$version")
done

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_26_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
quiet "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${REQS[@]}"

# One version of each: two would stop the install on the device.
dupes=$(ls "$DEST" | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
  echo "gpu_wheels: more than one version of: $dupes" >&2
  exit 1
fi
count=$(ls "$DEST"/*.whl | wc -l)
if [[ "$count" -ne "${#REQS[@]}" ]]; then
  echo "gpu_wheels: expected ${#REQS[@]} wheels, got $count" >&2
  exit 1
fi
echo "gpu_wheels: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST"

[[ "${1:-}" == "--verify" ]] || exit 0

# ------------------------------------------------------------------- verification
# A throwaway Python 3.12 venv holding only what the GPU machine has that matters here
# (KINDS.md's list, at versions found on the registry), then:
#  1. resolve ipyparallel + the grpc packages with --no-index from .whl/ alone (so every
#     requirement is either there already or in .whl/), and `pip check`;
#  2. install .whl/ the device way (--target, PYTHONPATH, no tether install) into a fresh
#     base venv and start a tether-server from a copy of the repo: the engines must
#     import tether_server through the inherited PYTHONPATH; run one demo task.
PY312=""
for cand in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    PY312=$(command -v "$cand"); break
  fi
done
if [[ -z "$PY312" ]]; then
  echo "gpu_wheels: no Python 3.12 here; checking Requires-Dist by hand is left to you" >&2
  exit 1
fi
WORK=$(mktemp -d /tmp/gpu-wheels-verify.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
BASE_PKGS=(psutil rich tqdm packaging pygments "python-dateutil<3" "typing-extensions<4.13" six)
echo "gpu_wheels: verifying with $PY312 in $WORK"

"$PY312" -m venv "$WORK/resolve"
quiet "$WORK/resolve/bin/python" -m pip install -q "${BASE_PKGS[@]}"
quiet "$WORK/resolve/bin/python" -m pip install -q --no-index --find-links "$ROOT/$DEST" \
  ipyparallel grpcio grpcio-status grpcio-health-checking grpcio-reflection protobuf googleapis-common-protos
"$WORK/resolve/bin/python" -m pip check
echo "gpu_wheels: 1/2 closure resolves from .whl/ plus the base packages; pip check is clean"

"$PY312" -m venv "$WORK/device"
quiet "$WORK/device/bin/python" -m pip install -q "${BASE_PKGS[@]}"
quiet "$WORK/device/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$WORK/site" "$ROOT/$DEST"/*.whl
mkdir -p "$WORK/repo"
cp -r "$ROOT/server" "$ROOT/clients" "$WORK/repo/"
find "$WORK/repo" -name __pycache__ -prune -exec rm -rf {} +
(
  cd "$WORK/repo"
  export PYTHONPATH="$WORK/site:$WORK/repo/server:$WORK/repo/clients/python"
  "$WORK/device/bin/python" - <<'EOF'
import os, signal, socket, subprocess, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf import struct_pb2
from tether.v1 import task_service_pb2 as ts, task_service_pb2_grpc as tsg, task_pb2
import tether_server
assert tether_server.__file__.startswith(os.getcwd()), tether_server.__file__
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
addr = f"127.0.0.1:{port}"
log = open("server.log", "w")
proc = subprocess.Popen([sys.executable, "-m", "tether_server", "--listen", addr, "--engines", "1",
                         "--data-dir", os.path.abspath("data")], stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True)
try:
    ch = grpc.insecure_channel(addr)
    health = health_pb2_grpc.HealthStub(ch)
    deadline = time.monotonic() + 90
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("server not SERVING:\n" + open("server.log").read())
        time.sleep(0.2)
    stub = tsg.TaskServiceStub(ch)
    args = struct_pb2.Struct(); args.update({"seconds": 0.2})
    name = stub.SubmitTask(ts.SubmitTaskRequest(task="demo.sleep", args=args), timeout=10).task.name
    deadline = time.monotonic() + 60
    while (t := stub.GetTask(ts.GetTaskRequest(name=name), timeout=10).task).state in (1, 2):
        if time.monotonic() > deadline:
            raise SystemExit("demo task did not finish")
        time.sleep(0.1)
    print("gpu_wheels: demo.sleep ended", task_pb2.TaskState.Name(t.state), "on engine", t.engine_id)
    assert t.state == task_pb2.TASK_STATE_SUCCEEDED, t
finally:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill(); proc.wait(5)
EOF
)
echo "gpu_wheels: 2/2 a tether-server ran a task on Python 3.12 with only .whl/ on PYTHONPATH"
