#!/usr/bin/env bash
# The service image built and run for real, with podman, on a machine whose registry is out of reach:
#   1. a python3.11 base image made from Debian's packages (mmdebstrap), imported with `podman import`;
#   2. `podman build` of the Dockerfile on it (PYTHON_IMAGE), pip's index settings as build arguments;
#   3. the image run as the Kubernetes manifest runs it: uid 10001, read-only root filesystem, all capabilities
#      dropped, the models on a volume (seeded from the image as the init container does), /tmp a tmpfs;
#      /readyz awaited, /score answered, a refit published and activated, then a new container on the same
#      volume: the refit must still be the active version.
# Prints one JSON object (timings, image size) and writes it to $WORK/result.json. CI does not run it.
#
#   sudo scripts/container-e2e.sh              # needs podman and mmdebstrap (Debian: apt-get install podman mmdebstrap)
#
# Settings (environment): WORK, BASE_IMAGE, IMAGE, PORT, DEBIAN_SUITE, DEBIAN_MIRROR, REBUILD_BASE=1, and
# BUILD_ARGS / BUILD_VOLUMES for pip (e.g. BUILD_ARGS="--build-arg PIP_FIND_LINKS=/wheels" BUILD_VOLUMES="-v /w:/wheels:ro").
# Where /opt/wheels holds the CPU torch wheel (this project's machines), it is mounted and used by default.
# PODMAN_OPTS (default "--runtime runc") and ULIMITS go to every podman build / run: on this project's VMs (hybrid
# cgroups, where crun refuses to start anything) runc runs the containers, and the process limits cannot be raised
# past the host's (podman's default nproc is), so they are set to what the host allows.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/saft-container}
BASE=${BASE_IMAGE:-localhost/saft-python:3.11-bookworm}
IMAGE=${IMAGE:-localhost/saft-filter:cpu}
PORT=${PORT:-18000}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NAME=saft-e2e
VOLUME=saft-e2e-models
ADMIN=e2e-admin-token
CLIENT=e2e-client-token
DATA=${DATA:-$ROOT/../shared/data/calibration.jsonl}
mkdir -p "$WORK"
read -r -a podman_opts <<< "${PODMAN_OPTS:---runtime runc}"
read -r -a ulimits <<< "${ULIMITS:---ulimit nofile=$(ulimit -n):$(ulimit -n) --ulimit nproc=4096:4096}"
read -r -a build_args <<< "${BUILD_ARGS:-}"
read -r -a build_volumes <<< "${BUILD_VOLUMES:-}"
if [ -z "${BUILD_ARGS:-}" ] && [ -d /opt/wheels ] && ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  build_volumes=(-v /opt/wheels:/opt/wheels:ro)
  build_args=(--build-arg PIP_FIND_LINKS=/opt/wheels --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
  # This machine reaches PyPI through a TLS-inspecting proxy: pip in the build trusts the host's CA bundle.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    build_volumes+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro)
    build_args+=(--build-arg PIP_CERT=/run/host-ca.crt)
  fi
fi

now() { date +%s.%N; }
since() { python3 -c "import sys; print(round($(now) - $1, 1))"; }
say() { echo "[container-e2e] $*" >&2; }
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# 1. The base image from Debian's packages.
t=$(now)
if [ -n "${REBUILD_BASE:-}" ] || ! podman image exists "$BASE"; then
  say "base image $BASE from $SUITE ($MIRROR)"
  rm -f "$WORK/base.tar"
  mmdebstrap --variant=minbase --include=python3.11,python3-venv,python-is-python3,ca-certificates,libjemalloc2 \
    "$SUITE" "$WORK/base.tar" "$MIRROR" >&2
  podman import --change 'CMD ["python3"]' "$WORK/base.tar" "$BASE" >&2
fi
base_s=$(since "$t")

# 2. The image.
t=$(now)
say "podman build $IMAGE ${build_args[*]}"
podman "${podman_opts[@]}" build "${ulimits[@]}" --network host "${build_volumes[@]}" --build-arg PYTHON_IMAGE="$BASE" "${build_args[@]}" -t "$IMAGE" "$ROOT" >&2
build_s=$(since "$t")
size_mb=$(podman image inspect "$IMAGE" --format '{{.Size}}' | python3 -c "import sys; print(round(int(sys.stdin.read()) / 2**20))")

# 3. Run it as deploy/k8s does.
podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
podman volume create "$VOLUME" >/dev/null
secure=("${ulimits[@]}" --user 10001:10001 --read-only --cap-drop ALL --security-opt no-new-privileges)
podman "${podman_opts[@]}" run --rm "${secure[@]}" -v "$VOLUME:/models:U" --entrypoint sh "$IMAGE" \
  -ec 'for d in /app/models/*/; do n=$(basename "$d"); [ -e "/models/$n" ] || cp -R "$d" "/models/$n"; done'

serve() {
  podman "${podman_opts[@]}" run -d --name "$NAME" "${secure[@]}" --network host --tmpfs /tmp:rw,size=1g -v "$VOLUME:/models" \
    -e SAFT_MODELS_DIR=/models -e SAFT_PORT="$PORT" -e SAFT_ADMIN_TOKEN="$ADMIN" -e SAFT_API_TOKENS="$CLIENT" \
    "$IMAGE" serve >/dev/null
  local t0 deadline
  t0=$(now); deadline=$(( $(date +%s) + 300 ))
  until curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
    if [ "$(date +%s)" -gt "$deadline" ] || [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" != true ]; then
      podman logs "$NAME" >&2; say "not ready"; exit 1
    fi
    sleep 1
  done
  since "$t0"
}

t=$(now)
ready_s=$(serve)
say "ready in ${ready_s}s"
[ "$(podman "${podman_opts[@]}" exec "$NAME" id -u)" = 10001 ] || { say "not uid 10001"; exit 1; }
if podman "${podman_opts[@]}" exec "$NAME" sh -c 'touch /app/x' 2>/dev/null; then say "the root filesystem is writable"; exit 1; fi
curl -fsS -H "Authorization: Bearer $CLIENT" -H 'content-type: application/json' "http://127.0.0.1:$PORT/score" \
  -d '{"items": [{"text": "How do I bake bread?"}, {"prompt": "Write a haiku.", "response": "Autumn moon rises."}]}' \
  > "$WORK/score.json"
python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['results']; assert len(r) == 2 and all(x['verdict'] in ('keep', 'drop') for x in r), r" "$WORK/score.json"
before=$(curl -fsS -H "Authorization: Bearer $CLIENT" "http://127.0.0.1:$PORT/subspace" | python3 -c "import json, sys; print(json.load(sys.stdin)['version'])")

# A small labelled refit (20 lines of each label from the calibration data), activated whatever the guard says.
python3 - "$DATA" "$WORK/upload.jsonl" <<'EOF'
import json, random, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
random.Random(0).shuffle(rows)
picked = [r for label in (0, 1) for r in [r for r in rows if r.get("label") == label][:20]]
open(sys.argv[2], "w").write("".join(json.dumps(r) + "\n" for r in picked))
EOF
t_refit=$(now)
job=$(curl -fsS -X POST -H "Authorization: Bearer $ADMIN" -H 'content-type: application/x-ndjson' \
  --data-binary "@$WORK/upload.jsonl" "http://127.0.0.1:$PORT/subspace/refit?activate=always" |
  python3 -c "import json, sys; print(json.load(sys.stdin)['job_id'])")
while :; do
  state=$(curl -fsS -H "Authorization: Bearer $CLIENT" "http://127.0.0.1:$PORT/subspace/jobs/$job")
  status=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['status'])" "$state")
  [ "$status" = succeeded ] && break
  [ "$status" = failed ] && { say "refit failed: $state"; exit 1; }
  sleep 2
done
refit_s=$(since "$t_refit")
after=$(curl -fsS -H "Authorization: Bearer $CLIENT" "http://127.0.0.1:$PORT/subspace" | python3 -c "import json, sys; print(json.load(sys.stdin)['version'])")
[ "$after" != "$before" ] || { say "the refit did not activate a new version"; exit 1; }
say "refit $before -> $after in ${refit_s}s"

# A new container on the same volume: the refit survives.
podman stop -t 45 "$NAME" >/dev/null && podman rm "$NAME" >/dev/null
restart_ready_s=$(serve)
survived=$(curl -fsS -H "Authorization: Bearer $CLIENT" "http://127.0.0.1:$PORT/subspace" | python3 -c "import json, sys; print(json.load(sys.stdin)['version'])")
[ "$survived" = "$after" ] || { say "after the restart $survived is active, not $after"; exit 1; }
say "restarted in ${restart_ready_s}s, $survived still active"

python3 - "$WORK/result.json" <<EOF
import json, sys
result = {"base_image_s": $base_s, "build_s": $build_s, "image_mb": $size_mb, "ready_s": $ready_s, "refit_s": $refit_s,
          "restart_ready_s": $restart_ready_s, "active_before": "$before", "refit_version": "$after",
          "after_restart": "$survived", "uid": 10001, "read_only_root": True, "podman": "$(podman --version)"}
open(sys.argv[1], "w").write(json.dumps(result, indent=1) + "\n")
print(json.dumps(result))
EOF
