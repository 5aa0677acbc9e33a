#!/usr/bin/env bash
# Sets up .venv in the project root with everything napari-mirror needs.
#   scripts/setup.sh          runtime + plugin (what a user needs)
#   scripts/setup.sh --dev    + Qt binding, pytest, Xvfb (tests)
# Idempotent: re-running only installs what is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
dev=0
[[ "${1:-}" == "--dev" ]] && dev=1
PY="${PYTHON:-python3}"

if [[ $dev == 1 && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  # OpenGL needs an X server for napari's canvas (design §4).
  need=()
  for p in xvfb libgl1-mesa-dri libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-xinput0 libxcb-image0 \
           libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 \
           libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if ((${#need[@]})); then
    echo "[setup] apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
V=.venv/bin/python
# This machine's pip config lists local indexes; silence its per-package "is ignored" noise.
pipq() { $V -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq install -q --upgrade pip >/dev/null
# torch first, pinned to the CPU build where one is available locally, so the
# ">=" range in pyproject.toml is already satisfied and no multi-GB CUDA build is pulled.
if ! $V -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch"
  pipq install -q "torch==${MIRROR_TORCH_VERSION:-2.13.0}"
fi
if [[ $dev == 1 ]]; then
  pipq install -q -e ".[dev]"
else
  pipq install -q -e .
fi
echo "[setup] ready: $($V -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)')"
