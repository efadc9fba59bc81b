"""Float32 precision is explicit, and GPU loaders treat warnings deliberately.

The settings of `rnn_xp.precision` are process-wide flags of torch, JAX and
CuPy; on a CPU they exist (torch, JAX) but change no result, so here they are
checked for what they say, not for speed. GPU loading is checked with a
NumPy stand-in for the library: what it warns decides whether it loads.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from rnn_xp import _backends, precision
from rnn_xp._backends import BackendUnavailable

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")


@pytest.fixture(autouse=True)
def _restored():
    """Each test leaves the libraries' flags as it found them."""
    raw = {name: knob.raw(m) for name, knob, m in _knobs()}
    yield
    for name, knob, m in _knobs():
        knob.apply(m, raw[name])


def _knobs():
    return [(n, precision._KNOBS[n], m) for n, m in (("torch", torch), ("jax", jax))]


@pytest.mark.parametrize("mode", precision.MODES)
def test_set_then_get_says_the_mode_in_every_library(mode):
    precision.set_float32_matmul(mode, "torch", "jax")
    assert precision.get_float32_matmul("torch", "jax") == {"torch": mode, "jax": mode}


def test_torch_mode_reaches_cublas_and_cudnn_rnns():
    precision.set_float32_matmul("tf32", "torch")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.rnn.fp32_precision == "tf32"
    precision.set_float32_matmul("ieee", "torch")
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
    assert jax.config.jax_default_matmul_precision != "tensorfloat32"


def test_the_context_restores_each_flag_exactly():
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    jax.config.update("jax_default_matmul_precision", None)
    before = precision.get_float32_matmul("torch", "jax")
    assert before == {"torch": "ieee (cuBLAS), tf32 (cuDNN RNN)", "jax": "default"}
    with precision.float32_matmul("ieee", "torch", "jax") as old:
        assert old == before
        assert precision.get_float32_matmul("torch", "jax") == {"torch": "ieee", "jax": "ieee"}
    assert precision.get_float32_matmul("torch", "jax") == before
    with pytest.raises(KeyError), precision.float32_matmul("tf32", "torch"):
        raise KeyError("inside")
    assert precision.get_float32_matmul("torch") == {"torch": before["torch"]}


@pytest.mark.parametrize("mode", precision.MODES)
def test_torch_code_using_the_older_flags_reads_what_was_set(mode):
    """torch raises when its allow_tf32 flags contradict the fp32_precision ones."""
    precision.set_float32_matmul(mode, "torch")
    assert torch.backends.cuda.matmul.allow_tf32 is (mode == "tf32")
    assert torch.backends.cudnn.allow_tf32 is (mode == "tf32")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=mode == "tf32"):
        pass
    with precision.float32_matmul("tf32" if mode == "ieee" else "ieee", "torch"):
        assert torch.backends.cudnn.allow_tf32 is (mode == "ieee")
    assert torch.backends.cudnn.allow_tf32 is (mode == "tf32")


def test_older_flags_set_by_the_caller_are_read_and_restored():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False
    assert precision.get_float32_matmul("torch") == {"torch": "tf32 (cuBLAS), ieee (cuDNN RNN)"}
    with precision.float32_matmul("ieee", "torch"):
        assert precision.get_float32_matmul("torch") == {"torch": "ieee"}
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cudnn.allow_tf32 is False


def test_jax_context_is_this_threads_and_sees_a_thread_local_setting():
    jax.config.update("jax_default_matmul_precision", None)
    with jax.default_matmul_precision("tensorfloat32"):
        with precision.float32_matmul("ieee", "jax") as before:
            assert before == {"jax": "tf32"}
            assert precision.get_float32_matmul("jax") == {"jax": "ieee"}
        assert precision.get_float32_matmul("jax") == {"jax": "tf32"}
        with pytest.raises(ValueError, match=r"^libraries: JAX's matmul precision is held"):
            precision.set_float32_matmul("ieee", "jax")
    assert jax.config.jax_default_matmul_precision is None


def test_no_names_means_the_imported_libraries():
    got = precision.get_float32_matmul()
    assert {"torch", "jax"} <= set(got)
    assert ("cupy" in got) == ("cupy" in sys.modules)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: precision.set_float32_matmul("tf16", "torch"),
            r"^mode: expected one of 'ieee', 'tf32', got 'tf16'$",
        ),
        (
            lambda: precision.set_float32_matmul("ieee", "numpy"),
            r"^libraries: expected some of torch, jax, cupy, got numpy$",
        ),
        (lambda: precision.get_float32_matmul("tensorflow"), r"^libraries: .* got tensorflow$"),
    ],
)
def test_bad_arguments_name_themselves(call, message):
    before = precision.get_float32_matmul("torch", "jax")
    with pytest.raises(ValueError, match=message):
        call()
    assert precision.get_float32_matmul("torch", "jax") == before


def test_a_library_that_is_missing_says_how_to_install_it():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(_backends.BackendNotInstalled, match=r"rnn-xp\[cuda12\]"):
            precision.set_float32_matmul("ieee", "cupy")
    else:  # pragma: no cover - GPU machines
        pytest.skip("CuPy is installed here")


def test_the_torch_cuda_backend_pins_ieee(monkeypatch):
    """Loading torch:cuda sets IEEE float32 in cuBLAS and cuDNN (checked without a GPU)."""
    precision.set_float32_matmul("tf32", "torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    loaded = _backends._torch("cuda")()
    assert loaded.name == "torch:cuda"
    assert precision.get_float32_matmul("torch") == {"torch": "ieee"}


def test_the_jax_backends_pin_ieee():
    precision.set_float32_matmul("tf32", "jax")
    _backends.BACKENDS["jax"].load()
    assert precision.get_float32_matmul("jax") == {"jax": "ieee"}


# -- warnings while a GPU library loads -----------------------------------------------


def _warning_load(*messages, category=UserWarning):
    def load():
        for m in messages:
            warnings.warn(m, category, stacklevel=1)
        return _backends.BACKENDS["numpy"].load()

    return load


def test_an_unexplained_warning_makes_the_backend_unavailable_with_its_text():
    with pytest.raises(
        BackendUnavailable,
        match=r"^cupy warned while loading: UserWarning: peer access is off \(test_precision\.py:\d+\)$",
    ):
        _backends._checked_gpu("cupy", _warning_load("peer access is off"))


def test_a_warning_of_another_category_is_not_explained_by_its_text():
    text = "CUDA path could not be detected. Set CUDA_PATH"
    with pytest.raises(BackendUnavailable, match="FutureWarning"):
        _backends._checked_gpu("cupy", _warning_load(text, category=FutureWarning))


def test_warnings_python_hides_by_default_do_not_unload_a_backend():
    load = _warning_load("a dependency's old API", category=DeprecationWarning)
    assert _backends._checked_gpu("cupy", load).name == "numpy"


def test_a_handled_warning_loads_and_stays_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = _backends._checked_gpu(
            "cupy", _warning_load("CUDA path could not be detected. Set CUDA_PATH ...")
        )
    assert loaded.name == "numpy"
    assert all(len(reason) > 30 for *_, reason in _backends._HANDLED_WARNINGS)


def test_a_genuine_failure_still_fails():
    def broken():
        raise RuntimeError("cudaErrorIllegalAddress")

    with pytest.raises(RuntimeError, match="cudaErrorIllegalAddress"):
        _backends._checked_gpu("cupy", broken)


def test_a_warning_at_the_first_kernel_is_seen_too(monkeypatch):
    loaded = _backends.BACKENDS["numpy"].load()

    def to_numpy(a):
        warnings.warn("pinned memory fallback", RuntimeWarning, stacklevel=1)
        return np.asarray(a)

    from dataclasses import replace

    with pytest.raises(BackendUnavailable, match="RuntimeWarning: pinned memory fallback"):
        _backends._checked_gpu("torch:cuda", lambda: replace(loaded, to_numpy=to_numpy))
