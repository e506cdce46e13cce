"""deploy/k8s is not applied here (no cluster): every manifest is validated against the Kubernetes
JSON schema (kubernetes-validate, which bundles the schemas: offline), and checked against the code:
every flag and TRIPTYCH_* variable exists, every probe port is a container port, the processor's
--encoder is the encoders' headless Service, the HPA scales the encoders on a metric they export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate  # a dev dependency (pyproject.toml), the schemas bundled in the wheel
import pytest
import yaml

from services.cli import SERVICE_CONFIGS, _parser
from services.common.flags import config_flags

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy/k8s/base"
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests are for (grpc probes: GA in 1.27)
SERVICES = ("processor", "encoder", "llm", "front")


def _kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def _resources() -> list[dict]:
    return [doc for name in _kustomization()["resources"] for doc in yaml.safe_load_all((BASE / name).read_text()) if doc]


def _of(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in _resources() if doc["kind"] == kind}


def _container(service: str) -> dict:
    (container,) = _of("Deployment")[service]["spec"]["template"]["spec"]["containers"]
    return container


def _args(service: str):
    """The container's args parsed by the CLI (its TRIPTYCH_MODEL supplied as --model where it has one)."""
    args = _container(service)["args"]
    assert args[:2] == ["serve", service]
    env = {e["name"]: e["value"] for e in _container(service).get("env", [])}
    model = ["--model", env["TRIPTYCH_MODEL"]] if "TRIPTYCH_MODEL" in env else []
    return _parser().parse_args([*args, *model])


def test_kustomization_lists_every_manifest():
    listed = _kustomization()["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert [image["name"] for image in _kustomization()["images"]] == ["triptych"]


def test_kustomize_builds_what_the_schema_accepts():
    # kubectl ships with these machines (its built-in kustomize builds offline); missing, this fails.
    assert shutil.which("kubectl"), "kubectl is not on PATH: install it (Debian: kubectl) to build deploy/k8s"
    built = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=True)
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in _resources())
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "triptych"


@pytest.mark.parametrize("strict", [False, True])
def test_manifests_match_the_kubernetes_schema(strict):
    """strict: no field the schema does not know (a typo such as `readinessprobe` would pass otherwise)."""
    resources = _resources()
    assert {doc["kind"] for doc in resources} == {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for doc in resources:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=strict)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")


def test_one_deployment_and_service_per_service():
    deployments, services = _of("Deployment"), _of("Service")
    assert set(deployments) == set(services) == set(SERVICES)
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        assert services[name]["spec"]["selector"] == labels  # each Service selects its own pods
        ports = {p["name"]: p["containerPort"] for p in _container(name)["ports"]}
        (service_port,) = services[name]["spec"]["ports"]
        assert ports[service_port["targetPort"]] == service_port["port"]


def test_every_arg_and_environment_variable_is_the_cli_s():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in SERVICES:
        container = _container(name)
        args = _args(name)  # the CLI accepts exactly these flags
        known = {cf.env for cf in config_flags(SERVICE_CONFIGS[name])}
        for env in container.get("env", []):
            assert env["name"] in known, f"{name}: {env['name']} is no variable of `serve {name}`"
        assert {e["name"]: e["value"] for e in container["env"]}["TRIPTYCH_HOST"] == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert args.port == ports["http" if name == "front" else "grpc"]
        if name != "front":
            assert (args.health_port, args.metrics_port) == (ports["health"], ports["metrics"])
            assert _parser().parse_args([*compose["services"][name]["command"], "--model", "/m"]).port == args.port
        # docker-compose.yml's image (docker/Dockerfile), renamed only by the kustomization's `images`.
        assert container["image"] == compose["x-triptych"]["image"] == "triptych:latest"


def test_probes_are_grpc_health_on_a_declared_port():
    for name in SERVICES:
        container = _container(name)
        ports = {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            if name == "front":  # HTTP: /health (alive) and /health/ready (the processor is SERVING)
                assert spec["httpGet"]["port"] in ports
                assert spec["httpGet"]["path"] == ("/health/ready" if probe == "readinessProbe" else "/health")
            else:  # Kubernetes' own grpc.health.v1 probe, on the plaintext --health-port
                assert set(spec["grpc"]) == {"port"}  # service "": the server's overall status
                assert spec["grpc"]["port"] in ports and spec["grpc"]["port"] == _args(name).health_port
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_the_processor_resolves_every_encoder_pod_through_a_headless_service():
    encoder_service = _of("Service")["encoder"]
    assert encoder_service["spec"]["clusterIP"] == "None"
    assert not encoder_service["spec"].get("publishNotReadyAddresses")  # DNS lists ready pods only
    encoder_labels = _of("Deployment")["encoder"]["spec"]["template"]["metadata"]["labels"]
    assert encoder_service["spec"]["selector"].items() <= encoder_labels.items()
    processor = _args("processor")
    (port,) = encoder_service["spec"]["ports"]
    assert processor.encoder_addrs == [f"encoder:{port['port']}"]
    assert processor.encoder_resolve_interval_s > 0  # pods the HPA adds join the pool
    assert processor.llm_addr == f"llm:{_of('Service')['llm']['spec']['ports'][0]['port']}"
    assert _args("front").processor_addr == f"processor:{_of('Service')['processor']['spec']['ports'][0]['port']}"
    for name in ("processor", "llm", "front"):
        assert _of("Service")[name]["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert _of("Service")[name]["spec"].get("clusterIP") != "None"


def test_the_hpa_scales_the_encoders_on_their_queue_metric():
    (hpa,) = _of("HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "encoder"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    metrics_code = (ROOT / "services/common/metrics.py").read_text()
    assert re.search(rf'GaugeMetricFamily\("{name}"', metrics_code), f"{name} is no gauge the encoder exports"
    assert hpa["spec"]["minReplicas"] <= _of("Deployment")["encoder"]["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert "prometheus-adapter" in (BASE / "encoder-hpa.yaml").read_text()


def test_metrics_are_scraped_where_the_services_serve_them():
    for name in ("processor", "encoder", "llm"):
        template = _of("Deployment")[name]["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == _args(name).metrics_port


def test_model_volume_is_mounted_where_triptych_model_points():
    claim = next(iter(_of("PersistentVolumeClaim")))
    for name in ("processor", "encoder", "llm"):
        pod = _of("Deployment")[name]["spec"]["template"]["spec"]
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        (mount,) = pod["containers"][0]["volumeMounts"]
        assert mount["name"] == volume["name"] and mount["readOnly"]
        assert str(_args(name).model) == mount["mountPath"]
    assert "volumes" not in _of("Deployment")["front"]["spec"]["template"]["spec"]
