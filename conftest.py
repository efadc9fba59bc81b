"""The cross-backend test matrix.

Any test that takes the ``backend`` (or ``xp``) fixture runs once per backend of
`rnn_xp._backends.BACKENDS`: numpy, numpy:readonly, array_api_strict (default
device and ``device1``), torch, jax (x64 on), dask, and on GPU cupy, torch:cuda
and jax:gpu. GPU backends carry the ``gpu`` marker.

A backend that cannot run here (library not installed, no GPU) is *skipped* with
the reason. Choose a subset with ``--backend NAME`` (repeatable) or with the
environment variable ``RNN_XP_BACKENDS="numpy,torch"``. With
``RNN_XP_REQUIRE_CPU_BACKENDS=1`` (as CI sets it) a CPU backend that cannot run
fails instead of skipping, so a green CI run means every CPU backend ran.
"""

from __future__ import annotations

import functools
import os

import pytest

from rnn_xp._backends import BACKENDS, BackendUnavailable, Loaded

BACKENDS_ENV = "RNN_XP_BACKENDS"
REQUIRE_ENV = "RNN_XP_REQUIRE_CPU_BACKENDS"
DTYPES = ("float32", "float64")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only this backend (repeatable); one of {', '.join(BACKENDS)}. "
        f"Default: ${BACKENDS_ENV} (comma-separated), else all.",
    )


def _selected(config: pytest.Config) -> list[str]:
    names = (
        config.getoption("--backend") or os.environ.get(BACKENDS_ENV, "").replace(",", " ").split()
    )
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"unknown backend(s) {', '.join(unknown)}; expected some of {', '.join(BACKENDS)}"
        )
    return names or list(BACKENDS)


def pytest_configure(config: pytest.Config) -> None:
    _selected(config)  # an unknown name is a usage error before collection starts


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        params = [
            pytest.param(name, id=name, marks=[pytest.mark.gpu] if BACKENDS[name].gpu else [])
            for name in _selected(metafunc.config)
        ]
        metafunc.parametrize("backend", params, indirect=True)


@functools.cache
def _load(name: str) -> Loaded | str:
    try:
        return BACKENDS[name].load()
    except BackendUnavailable as exc:
        return str(exc)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Loaded:
    """One backend of the matrix, loaded; skipped with a reason if it cannot run."""
    name = request.param
    loaded = _load(name)
    if isinstance(loaded, str):
        if os.environ.get(REQUIRE_ENV) == "1" and not BACKENDS[name].gpu:
            pytest.fail(f"{name} is required here ({REQUIRE_ENV}=1) but cannot run: {loaded}")
        pytest.skip(f"{name}: {loaded}")
    return loaded


@pytest.fixture
def xp(backend: Loaded):
    """The array namespace of the backend under test."""
    return backend.xp


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> str:
    """The name of a floating dtype; tolerances depend on it."""
    return request.param
