"""deploy/kubernetes/, offline: every manifest validates against the Kubernetes schemas
(kubernetes-validate) and the Prometheus Operator kinds against the operator's CRD schemas
(tests/crds/, see tests/crds/SOURCE.md); the generated manifests equal what grafana/ gives;
the PrometheusRule passes ``promtool check rules`` and the alert unit tests; the exporter's
pods are locked down and probed on the probe endpoints, never on the cluster's /health."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml

HERE = Path(__file__).parent
ROOT = HERE.parent
KUBE = ROOT / "deploy" / "kubernetes"
CRDS = HERE / "crds"
#: The oldest Kubernetes minor version the manifests are checked against, and the newest the
#: installed kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", kv.latest_version())
OPERATOR_KINDS = {"ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules"}


def load_manifests() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/kubernetes/ (not the Kustomization), by relative path."""
    found = {}
    for path in sorted(KUBE.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, path
        found[str(path.relative_to(KUBE))] = docs[0]
    return found


MANIFESTS = load_manifests()


def manifests_of(kind: str) -> dict[str, dict[str, Any]]:
    return {path: m for path, m in MANIFESTS.items() if m["kind"] == kind}


def exporter() -> dict[str, Any]:
    deployment: dict[str, Any] = MANIFESTS["exporter-deployment.yaml"]
    return deployment


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("manifests", ROOT / "deploy" / "manifests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "path", [p for p, m in MANIFESTS.items() if m["kind"] not in OPERATOR_KINDS]
)
def test_manifest_validates_against_kubernetes_schema(path: str, version: str) -> None:
    kv.validate(MANIFESTS[path], version, strict=True)  # raises ValidationError


def test_kubernetes_validation_is_not_vacuous() -> None:
    broken = copy.deepcopy(exporter())
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[0], strict=True)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's schema with unknown fields refused where it lists the fields (the API server
    would silently prune them: a typo would go unnoticed)."""
    schema = dict(schema)
    if schema.get("pattern", "").startswith("^(?i)"):  # Go regexp syntax; Python's flag goes first
        schema["pattern"] = "(?i)^" + schema["pattern"].removeprefix("^(?i)")
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    return schema


def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{OPERATOR_KINDS[kind]}.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return strict(schema)


@pytest.mark.parametrize("kind", sorted(OPERATOR_KINDS))
def test_operator_kinds_validate_against_the_crd_schema(kind: str) -> None:
    (manifest,) = manifests_of(kind).values()
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    schema = crd_schema(kind)
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft7Validator)
    # kubernetes-validate checks the object metadata the CRD leaves open
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]}
    kv.validate(meta, K8S_VERSIONS[0], strict=True)


def test_crd_validation_is_not_vacuous() -> None:
    monitor = copy.deepcopy(next(iter(manifests_of("ServiceMonitor").values())))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, crd_schema("ServiceMonitor"))
    rule = copy.deepcopy(next(iter(manifests_of("PrometheusRule").values())))
    del rule["spec"]["groups"][0]["name"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, crd_schema("PrometheusRule"))


def test_crds_name_their_source_and_version() -> None:
    source = (CRDS / "SOURCE.md").read_text()
    for kind, plural in OPERATOR_KINDS.items():
        crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{plural}.yaml").read_text())
        version = crd["metadata"]["annotations"]["operator.prometheus.io/version"]
        assert f"monitoring.coreos.com_{plural}.yaml" in source and version in source, kind


def test_kustomization_lists_every_exporter_manifest() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    top_level = {p for p in MANIFESTS if "/" not in p}
    assert set(kustomization["resources"]) == top_level
    assert all((KUBE / r).is_file() for r in kustomization["resources"])


# --- generated from grafana/ ---------------------------------------------------------------


def test_generated_manifests_are_current() -> None:
    """`make manifests` has been run after the last change of grafana/."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "manifests.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    gen = generator()
    for name, make in gen.GENERATED.items():
        assert (KUBE / name).read_text() == make(), name


def test_generated_manifests_carry_the_sources_unchanged() -> None:
    rule = MANIFESTS["prometheusrule.yaml"]
    assert rule["spec"] == yaml.safe_load((ROOT / "grafana" / "alerts.yml").read_text())
    board = MANIFESTS["grafana-dashboard-configmap.yaml"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = ROOT / "grafana" / "conduit-cache-statistics.json"
    assert board["data"] == {dashboard.name: dashboard.read_text()}


def test_check_fails_on_a_stale_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = generator()
    monkeypatch.setattr(gen, "OUT", tmp_path)
    assert gen.main([]) == 0  # writes both into tmp_path
    assert gen.main(["--check"]) == 0
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(stale.read_text().replace("> 0.5", "> 0.7"))
    assert gen.main(["--check"]) == 1


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install prometheus (apt-get install prometheus)")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60)


def test_prometheusrule_passes_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(MANIFESTS["prometheusrule.yaml"]["spec"]))
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    unit = (HERE / "promtool" / "alerts_test.yml").read_text()
    assert "  - ../../grafana/alerts.yml\n" in unit
    (tmp_path / "alerts_test.yml").write_text(unit.replace("../../grafana/alerts.yml", "rules.yml"))
    tested = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


# --- what the exporter's pods are ----------------------------------------------------------


def test_exporter_runs_two_locked_down_serve_replicas() -> None:
    spec = exporter()["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "serve" and "0.0.0.0" in container["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"} and "memory" in resources["limits"]
    # sized from serve's memory with its render process at 1000 x 100 (docs/performance.md,
    # python -m benchmarks.serve_memory): above the peak even counted as RSS of both
    text = re.sub(r"\s+", " ", (ROOT / "docs" / "performance.md").read_text())
    measured = re.search(
        r"at 1000 \u00d7 100 (\d+) MB idle and (\d+) MB peak with 4 scrapers and 200 slow "
        r"clients \(RSS (\d+) MB serving, (\d+) MB render process\)",
        text,
    )
    assert measured is not None
    peak, rss = int(measured[2]) * 10**6, (int(measured[3]) + int(measured[4])) * 10**6
    request, limit = (int(resources[k]["memory"].removesuffix("Mi")) * 2**20
                      for k in ("requests", "limits"))  # fmt: skip
    assert peak < rss < request < limit and limit >= 2 * peak
    comment = re.sub(r"\s+#?\s*", " ", (KUBE / "exporter-deployment.yaml").read_text())
    assert f"{measured[1]} MB idle and {measured[2]} MB peak at 1000 instances x 100" in comment


def test_probes_use_probe_endpoints_never_the_cluster_health() -> None:
    (container,) = exporter()["spec"]["template"]["spec"]["containers"]
    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert paths == {"livenessProbe": "/-/healthy", "readinessProbe": "/-/ready",
                     "startupProbe": "/-/healthy"}  # fmt: skip
    assert "/health" not in yaml.safe_dump(exporter()).replace("/-/healthy", "")


def test_redis_url_comes_from_the_secret_the_overlay_generates(tmp_path: Path) -> None:
    """No placeholder Secret is ever applied: the production overlay generates it from a
    file the user creates (rendering fails, naming it, until then)."""
    failed = kustomize(OVERLAYS / "production", check=False)
    assert failed.returncode != 0 and "redis.env" in failed.stderr
    rendered = render_overlay(tmp_path, "production")
    (secret,) = [m for m in rendered if m["kind"] == "Secret"]
    (deployment,) = [m for m in rendered if m["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["CONDUIT_CACHE_STATS_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "url"}  # the hashed name
    example = (OVERLAYS / "production" / "redis.env.example").read_text()
    assert example.startswith("url=redis://") and example.rstrip().endswith("/1")  # own db
    assert "redis.env\n" in (ROOT / ".gitignore").read_text().replace("redis.env.example", "")
    assert not [m for m in load_manifests().values() if m["kind"] == "Secret"]


def test_service_monitor_scrapes_every_exporter_pod() -> None:
    service = MANIFESTS["exporter-service.yaml"]
    monitor = MANIFESTS["servicemonitor.yaml"]
    pod_labels = exporter()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "http-metrics"
    assert endpoint["path"] == "/metrics"
    (port,) = exporter()["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert port["name"] == "http-metrics" and port["containerPort"] == 9464


def test_application_example_outlasts_gunicorns_graceful_timeout_and_is_probed() -> None:
    pod = MANIFESTS["example-app/deployment.yaml"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    graceful = int(args[args.index("--graceful-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > graceful  # README, "Process models"
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert container["livenessProbe"]["httpGet"]["port"] == "http"


def test_application_example_gives_every_worker_its_own_instance() -> None:
    app = MANIFESTS["example-app/deployment.yaml"]
    (container,) = app["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "gunicorn" and "--workers" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HOSTNAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "INSTANCE_ID" not in env and "CONDUIT_CACHE_STATS_INSTANCE_ID" not in env
    assert env["CONDUIT_CACHE_STATS_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    assert all(n.startswith("CONDUIT_CACHE_STATS_") for n in env if n != "HOSTNAME")
    from conduit_otel_cache.config import Settings

    names = {f"CONDUIT_CACHE_STATS_{n.upper()}" for n in Settings.__dataclass_fields__}
    assert set(env) - {"HOSTNAME"} <= names  # every variable is a real option


def test_application_example_spools_on_an_emptydir() -> None:
    """A SIGKILLed worker loses nothing: spool_dir is a mounted emptyDir (it survives
    container restarts), writable under the read-only root file system."""
    pod = MANIFESTS["example-app/deployment.yaml"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    spool_dir = env["CONDUIT_CACHE_STATS_SPOOL_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == spool_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume and not mount.get("readOnly")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


# --- the image ----------------------------------------------------------------------------


def test_dockerfile_installs_as_the_readme_says() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    runs = re.findall(r"^RUN (.+)$", dockerfile, re.MULTILINE)
    install = [r for r in runs if "pip install" in r]
    assert install, dockerfile
    for step in install:
        assert step in readme, step
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["/opt/conduit-otel-cache/bin/conduit-otel-cache"]' in dockerfile
    assert exporter()["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    assert "not built by CI" in readme


# --- the kit as kustomize renders it ------------------------------------------------------

OVERLAYS = ROOT / "deploy" / "overlays"


def kustomize(path: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``kubectl kustomize path``; the tests fail (not skip) without kubectl: the machines
    that run them have it (kustomize v4 or newer: ``labels``, ``patches``)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: install kubectl (with kustomize v4+) to render the kit")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr
    return done


def render_overlay(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    """The overlay ``name`` rendered from a copy of deploy/ in which the files the user
    creates are made from the ``*.example`` files beside them."""
    copy_ = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", copy_)
    for example in (copy_ / "overlays").rglob("*.example"):
        example.with_suffix("").write_text(example.read_text())
    for name_ in ("tls.crt", "tls.key"):
        (copy_ / "overlays" / "web-config" / name_).write_text("PEM\n")
    rendered = kustomize(copy_ / "overlays" / name).stdout
    return [d for d in yaml.safe_load_all(rendered) if d is not None]


def validate(objects: list[dict[str, Any]]) -> None:
    """Every rendered object against the Kubernetes schemas or the operator's CRD schema."""
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            jsonschema.validate(obj, crd_schema(obj["kind"]), cls=jsonschema.Draft7Validator)
        else:
            for k8s in K8S_VERSIONS:
                kv.validate(obj, k8s, strict=True)


@pytest.mark.parametrize("overlay", [None, "production", "web-config"])
def test_kustomize_renders_the_kit_into_one_namespace(tmp_path: Path, overlay: str | None) -> None:
    objects = (
        [d for d in yaml.safe_load_all(kustomize(KUBE).stdout) if d is not None]
        if overlay is None
        else render_overlay(tmp_path, overlay)
    )
    validate(objects)
    kinds = sorted(o["kind"] for o in objects)
    base = ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule",
            "Service", "ServiceMonitor"]  # fmt: skip
    extra = {None: [], "production": ["Secret"], "web-config": ["Secret"] * 3}[overlay]
    assert kinds == sorted(base + extra)
    assert {o["metadata"].get("namespace") for o in objects} == {"monitoring"}
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert (
        container["resources"]
        == exporter()["spec"]["template"]["spec"]["containers"][0]["resources"]
    )


def test_network_policy_lets_only_prometheus_reach_the_exporter() -> None:
    (policy,) = [m for m in MANIFESTS.values() if m["kind"] == "NetworkPolicy"]
    pod_labels = exporter()["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert rule["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]


def test_web_config_overlay_mounts_the_file_serve_reads(tmp_path: Path) -> None:
    objects = render_overlay(tmp_path, "web-config")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    path = Path(args[args.index("--web-config-file") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    secret = secrets[volume["secret"]["secretName"]]
    assert {path.name, "tls.crt", "tls.key"} <= set(secret["data"])
    config = yaml.safe_load((OVERLAYS / "web-config" / "web-config.yml.example").read_text())
    assert Path(config["tls_server_config"]["cert_file"]).parent == path.parent
    # basic auth covers the probes' paths too: they check the port
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert set(container[probe]) >= {"tcpSocket"} and "httpGet" not in container[probe]
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["basicAuth"]["username"]["name"] in secrets
