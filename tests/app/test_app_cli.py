import subprocess
import sys

import uvicorn
from typer.testing import CliRunner

import app.logs
from app.cli import cli
from app.settings import Settings


def test_every_setting_is_a_serve_flag():
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in result.output, name


def test_serve_builds_settings_from_flags_over_environment(monkeypatch, tiny_bundle_dir):
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda asgi_app, **options: started.update(app=asgi_app, **options))
    monkeypatch.setattr(app.logs, "configure_logging", lambda level: started.update(log_level=level))
    result = CliRunner().invoke(
        cli,
        [
            "serve",
            "--bundle",
            str(tiny_bundle_dir),
            "--port",
            "9001",
            "--api-keys",
            "k1",
            "--api-keys",
            "k2",
            "--truncation",
            "head",
        ],
        env={"TRIAGE_PORT": "9000", "TRIAGE_MAX_BATCH_SIZE": "4"},
    )
    assert result.exit_code == 0, result.output
    settings = started["app"].state.settings
    assert started["port"] == 9001 and settings.port == 9001
    assert settings.max_batch_size == 4
    assert settings.api_keys == ["k1", "k2"] and settings.truncation == "head"
    assert started["log_level"] == "info"


def test_invalid_settings_exit_with_a_message_naming_the_field():
    result = CliRunner().invoke(cli, ["serve", "--bundle", "b", "--max-batch-size", "0"])
    assert result.exit_code == 2
    assert "max_batch_size" in result.output


def test_serve_without_onnx_runtime_names_the_extra_to_install(tiny_bundle_dir):
    """`pip install dsgkd-triage` without an extra, then `serve`: one line saying what to install, exit 2."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None; from app.cli import cli; "
        f"cli(['serve', '--bundle', {str(tiny_bundle_dir)!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "ONNX Runtime is not installed" in result.stderr and "dsgkd-triage[cpu]" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_a_bundle_exits_once_with_one_actionable_line(tmp_path):
    """A container started before its bundle was built: one line saying how to build it, exit 3, no traceback."""
    missing = tmp_path / "default"
    code = f"from app.cli import cli; cli(['serve', '--bundle', {str(missing)!r}])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"no model bundle at {missing}" in lines[0]
    assert "docker compose up" in lines[0] and "make model" in lines[0] and "TRIAGE_BUNDLE" in lines[0]
    missing.mkdir()  # a directory without a manifest.json is no bundle either
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1
