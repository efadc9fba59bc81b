"""The test matrix itself: backend selection by option and environment variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnn_xp._backends import BACKENDS, BackendUnavailable

ROOT = Path(__file__).resolve().parent.parent
ONE_TEST = "tests/test_layer_state.py::test_set_state_and_reset_state"


def run_pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RNN_XP_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", ONE_TEST, *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        check=False,
    )


def test_backend_option_selects_a_subset():
    result = run_pytest("--backend", "numpy", "--backend", "dask")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[numpy]" in result.stdout
    assert "[dask]" in result.stdout
    assert "2 tests collected" in result.stdout


def test_environment_variable_selects_a_subset():
    result = run_pytest(env={"RNN_XP_BACKENDS": "torch,array_api_strict:device1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[torch]" in result.stdout
    assert "[array_api_strict:device1]" in result.stdout
    assert "2 tests collected" in result.stdout


def test_unknown_backend_is_a_usage_error():
    result = run_pytest("--backend", "tensorflow")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "unknown backend(s) tensorflow" in result.stderr


def test_every_gpu_backend_is_marked_and_reports_why_it_cannot_run():
    gpu = [name for name, b in BACKENDS.items() if b.gpu]
    assert gpu == ["cupy", "torch:cuda", "jax:gpu"]
    for name in gpu:
        try:
            BACKENDS[name].load()
            reason = "loaded"
        except BackendUnavailable as exc:
            reason = str(exc)
        assert reason, name  # a skip always says why
