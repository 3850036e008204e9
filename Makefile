# Every target that needs the host runs setup first; setup is idempotent (seconds when done).
PY := .venv/bin/python

.PHONY: setup run test serve lint

setup:
	bash scripts/setup.sh

# The main job: the example CustomVideoX workflow through the real host -> an mp4 path.
run: setup
	$(PY) scripts/run_example.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests

# The real web UI on 127.0.0.1 (PORT=8188 by default).
serve: setup
	bash scripts/serve.sh

lint:
	.venv/bin/ruff check .
