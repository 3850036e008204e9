#!/usr/bin/env bash
# Start the real ComfyUI host with this pack and its web UI on 127.0.0.1 (PORT, default 8188).
# Models come from models/ via extra_model_paths.yaml; --cpu is added when torch sees no CUDA device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
COMFY="$ROOT/.host/ComfyUI"
PORT="${PORT:-8188}"
if [ ! -x "$PY" ] || [ ! -f "$COMFY/main.py" ]; then
  echo "host not set up: run \`make setup\` first" >&2
  exit 2
fi
ARGS=(--listen 127.0.0.1 --port "$PORT" --output-directory "$ROOT/output" --disable-auto-launch)
if [ -f "$ROOT/extra_model_paths.yaml" ]; then
  ARGS+=(--extra-model-paths-config "$ROOT/extra_model_paths.yaml")
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  ARGS+=(--cpu)
fi
echo "ComfyUI with CustomVideoX: http://127.0.0.1:$PORT  (Ctrl-C stops it)"
cd "$COMFY"
exec "$PY" main.py "${ARGS[@]}" "$@"
