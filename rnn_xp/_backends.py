"""Everything that knows which array library is which lives here.

Two things need that knowledge:

* the creation functions used by the cell and layer code (`zeros`, `zeros_like`,
  `arange`, `asarray`): CuPy's creation functions allocate on the *current*
  device, and array-api-compat ignores ``device=`` for CuPy, so new arrays must
  be created inside the target device's context.
* The backend registry used by ``python -m rnn_xp`` and by the test matrix: how
  to load each library, put a NumPy array on it, wait for it, and bring a result
  back to NumPy. A library is imported only when its backend is loaded.

No other module of rnn_xp asks which library an array comes from.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import (
    device,
    is_array_api_obj,
    is_cupy_array,
    is_cupy_namespace,
    is_jax_namespace,
)

from . import precision
from ._imports import BackendNotInstalled, BackendUnavailable
from ._imports import import_library as _import

__all__ = [
    "BACKENDS",
    "TOLERANCE",
    "Backend",
    "BackendNotInstalled",
    "BackendUnavailable",
    "Loaded",
    "arange",
    "asarray",
    "for_run",
    "zeros",
    "zeros_like",
]

TOLERANCE = {"float32": 1e-4, "float64": 1e-12}
"""Largest deviation from NumPy float64 allowed for a backend, relative to
max(1, max |reference|), by computation dtype. float32 rounds at ~6e-8 per
operation; an output here sums a few hundred products along the longest path."""


def _on(xp: ModuleType, device: Any) -> AbstractContextManager:
    """The context in which arrays of ``xp`` are created, and kernels run, on ``device``.

    CuPy allocates on the *current* device whatever ``device=`` says, and runs
    every kernel there; its devices are context managers. Other libraries put
    results where their operands are: nothing to enter.
    """
    return device if is_cupy_namespace(xp) and device is not None else nullcontext()


def _device_context(a: Any) -> AbstractContextManager:
    """`_on` for the library and device of the array ``a``."""
    return a.device if is_cupy_array(a) else nullcontext()


def on_device_of(xp: ModuleType, a: Any) -> AbstractContextManager:
    """The context in which new arrays of ``xp`` land on ``a``'s device."""
    return _device_context(a)


def on_model_device(method: Callable) -> Callable:
    """Run a method of an object holding ``_xp`` and ``_device`` on that device."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _on(self._xp, self._device):
            return method(self, *args, **kwargs)

    return run


def _first_array(values: Any) -> Any:
    """The first array among ``values``, looking one level into tuples, lists and dicts."""
    for v in values:
        inner = v.values() if isinstance(v, Mapping) else v if isinstance(v, (tuple, list)) else ()
        for a in (v, *inner):
            if is_array_api_obj(a):
                return a
    return None


def on_input_device(fn: Callable) -> Callable:
    """Run ``fn`` on the device of its first array argument: a public entry point.

    Every array a call creates, and every kernel it runs, then lands on the
    device of its inputs: with CuPy arrays on GPU 1, nothing runs on GPU 0,
    whichever device is current in the caller.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        a = _first_array((*args, *kwargs.values()))
        with nullcontext() if a is None else _device_context(a):
            return fn(*args, **kwargs)

    return run


def zeros(xp: ModuleType, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    """``xp.zeros(shape, dtype=dtype, device=device)``, honoured on CuPy too."""
    with _on(xp, device):
        return xp.zeros(shape, dtype=dtype, device=device)


def zeros_like(xp: ModuleType, a: Any) -> Any:
    """Zeros of the shape, dtype and device of ``a``."""
    return zeros(xp, tuple(a.shape), a.dtype, device(a))


def arange(xp: ModuleType, n: int, device: Any) -> Any:
    """``xp.arange(n, device=device)``, honoured on CuPy too."""
    with _on(xp, device):
        return xp.arange(n, device=device)


def asarray(xp: ModuleType, a: Any, dtype: Any, device: Any) -> Any:
    """A NumPy array as a new array of namespace ``xp`` on ``device``."""
    with _on(xp, device):
        return xp.asarray(a, dtype=dtype, device=device, copy=True)


def to_numpy(a: Any) -> np.ndarray:
    """The values of an array of any supported library, as a NumPy array on the host."""
    # torch tensors via .cpu(), CuPy via .get(), the rest through the buffer
    # protocol or __array__.
    for method in ("detach", "cpu", "get"):
        if hasattr(a, method) and not isinstance(a, np.ndarray):
            a = getattr(a, method)()
    return np.asarray(a)


def dtype_name(dtype: Any) -> str:
    """The name of a floating dtype of any library: float64, float32, bfloat16 or float16."""
    # str() of a dtype differs by library (float32, torch.float32, a jax class).
    text = str(dtype)
    for name in ("float64", "float32", "bfloat16", "float16"):  # bfloat16 before its substring
        if name in text:
            return name
    raise TypeError(f"dtype: cannot name {dtype!r}")


_REFUSED = {
    np.matrix: "* is a matrix product",
    np.ma.MaskedArray: "mask would be ignored",
}


def refusal(a: Any) -> str | None:
    """Why the NumPy subclass ``a`` cannot stand for a plain array; None for other arrays.

    The cells' algebra is elementwise, and these subclasses would silently
    compute something else (np.asarray gives the plain array NumPy means).
    """
    for cls, why in _REFUSED.items():
        if isinstance(a, cls):
            return f"{type(a).__module__}.{type(a).__name__}, whose {why}"
    return None


def check_dtype(xp: ModuleType, dtype: Any, device: Any) -> None:
    """TypeError unless arrays of ``xp`` on ``device`` really take ``dtype``.

    JAX without ``jax_enable_x64`` makes float64 arrays float32 with only a
    warning: a float64 model would silently compute in float32.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = asarray(xp, np.zeros(1), dtype, device).dtype
    if got != dtype:
        hint = (
            "; enable it first: jax.config.update('jax_enable_x64', True)"
            if is_jax_namespace(xp)
            else ""
        )
        name = getattr(dtype, "__name__", None) or str(dtype)
        raise TypeError(f"dtype: {xp.__name__} makes {name} arrays {got} here{hint}")


@dataclass(frozen=True)
class Loaded:
    """A backend ready to use.

    xp : the array-API namespace (array-api-compat's wrapper where there is one)
    device : where `asarray` puts arrays
    asarray : NumPy array -> array of this backend, on `device`, as a fresh copy
    to_numpy : array of this backend -> NumPy array (computes lazy arrays)
    block : waits until an array of this backend is computed
    compute : like `to_numpy` over a list at once (one graph evaluation on Dask)
    """

    name: str
    xp: ModuleType
    device: Any
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    block: Callable[[Any], Any]
    compute: Callable[[list], list] | None = None

    def to_numpy_all(self, arrays: list) -> list[np.ndarray]:
        """`to_numpy` of every array; Dask evaluates their shared graph once."""
        if self.compute is not None:
            return [np.asarray(a) for a in self.compute(arrays)]
        return [self.to_numpy(a) for a in arrays]


@dataclass(frozen=True)
class Backend:
    """A named way of running rnn_xp; `load` raises BackendUnavailable with a reason."""

    name: str
    gpu: bool
    _load: Callable[[], Loaded]

    def load(self) -> Loaded:
        return _checked_gpu(self.name, self._load) if self.gpu else self._load()


# Warnings a GPU library may give while it loads or first runs that rnn_xp
# handles: (category name, start of the message, why it does no harm). A
# loader that meets any other warning reports it as the reason the backend
# cannot run (the test matrix runs with warnings as errors).
_HANDLED_WARNINGS = (
    (
        "UserWarning",
        "CUDA path could not be detected",
        "CuPy's wheels find the CUDA libraries without CUDA_PATH; the kernel that "
        "the loader then runs proves it",
    ),
    (
        "UserWarning",
        "Can't initialize NVML",
        "torch uses NVML only for memory statistics, which rnn_xp does not read",
    ),
)


# Python hides these from users by default: they speak to the library's own
# developers (a dependency's deprecation), not to a caller of rnn_xp.
_QUIET = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _handled(w: warnings.WarningMessage) -> bool:
    if issubclass(w.category, _QUIET):
        return True
    text = str(w.message)
    return any(
        w.category.__name__ == category and text.startswith(start)
        for category, start, _ in _HANDLED_WARNINGS
    )


def _checked_gpu(name: str, load: Callable[[], Loaded]) -> Loaded:
    """``load()``, then a first matrix product and tanh, watched for warnings.

    An exception of the library is a genuine failure and propagates. A warning
    that `_HANDLED_WARNINGS` does not explain makes the backend unavailable,
    with the warning's text as the reason.
    """
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loaded = load()
        a = loaded.asarray(np.full((2, 2), 0.5, dtype=np.float32))
        first = loaded.to_numpy(loaded.block(loaded.xp.tanh(a @ a)))
    if not np.allclose(first, np.tanh(0.5), atol=1e-3):  # pragma: no cover - a broken GPU
        raise RuntimeError(f"{name}: tanh of a first product gave {first.tolist()}")
    for w in seen:
        if not _handled(w):
            where = f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"
            raise BackendUnavailable(
                f"{name} warned while loading: {w.category.__name__}: {w.message} ({where})"
            )
    return loaded


def _numpy(readonly: bool) -> Callable[[], Loaded]:
    def load() -> Loaded:
        import array_api_compat.numpy as xp

        def asarray(a: np.ndarray) -> np.ndarray:
            out = np.array(a, copy=True)
            out.flags.writeable = not readonly
            return out

        name = "numpy:readonly" if readonly else "numpy"
        return Loaded(name, xp, "cpu", asarray, np.asarray, lambda a: a)

    return load


def _array_api_strict(device_name: str | None) -> Callable[[], Loaded]:
    def load() -> Loaded:
        xp = _import("array_api_strict", "array-api-strict")
        info = xp.__array_namespace_info__()
        dev = info.default_device() if device_name is None else xp.Device(device_name)
        cpu = info.default_device()

        def to_numpy(a: Any) -> np.ndarray:
            return np.asarray(a.to_device(cpu))

        name = "array_api_strict" + ("" if device_name is None else f":{device_name}")
        return Loaded(
            name, xp, dev, lambda a: xp.asarray(a, device=dev, copy=True), to_numpy, lambda a: a
        )

    return load


def _torch(device: str) -> Callable[[], Loaded]:
    def load() -> Loaded:
        torch = _import("torch", "PyTorch")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise BackendUnavailable(
                f"PyTorch devices are cpu, cuda or cuda:N, not {device!r}"
            ) from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                build = (
                    "a CPU-only build"
                    if torch.version.cuda is None
                    else f"built for CUDA {torch.version.cuda}"
                )
                raise BackendUnavailable(
                    f"PyTorch {torch.__version__} ({build}) sees no CUDA GPU, "
                    f"so it cannot use {device!r}"
                )
            count = torch.cuda.device_count()
            if dev.index is not None and dev.index >= count:
                raise BackendUnavailable(
                    f"PyTorch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                    f"there is no {device!r}"
                )
            dev = torch.device(
                "cuda", torch.cuda.current_device() if dev.index is None else dev.index
            )
        elif dev.type != "cpu":
            raise BackendUnavailable(
                f"PyTorch devices are cpu, cuda or cuda:N, not {device!r} (rnn-xp does not "
                f"run on {dev.type})"
            )
        import array_api_compat.torch as xp

        def block(a: Any) -> Any:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return a

        loaded = Loaded(
            "torch" if dev.type == "cpu" else "torch:cuda",
            xp,
            dev,
            lambda a: torch.asarray(np.array(a, copy=True), device=dev),
            lambda a: a.detach().cpu().numpy(),
            block,
        )
        if dev.type == "cuda":  # IEEE float32 in cuBLAS and cuDNN's RNNs (default TF32)
            precision.set_float32_matmul("ieee", "torch")
        return loaded

    return load


def _jax(platform: str) -> Callable[[], Loaded]:
    def load() -> Loaded:
        jax = _import("jax", "JAX")
        # float64 needs x64; it must be on before any array is made.
        jax.config.update("jax_enable_x64", True)
        # Full float32 matmul precision: JAX uses TF32 on recent NVIDIA GPUs by
        # default, which would hide our own error behind the hardware's.
        precision.set_float32_matmul("ieee", "jax")
        try:
            dev = jax.devices(platform)[0]
        except RuntimeError as exc:
            raise BackendUnavailable(f"JAX sees no {platform} device ({exc})") from None
        import jax.numpy as xp

        loaded = Loaded(
            "jax" if platform == "cpu" else "jax:gpu",
            xp,
            dev,
            lambda a: jax.device_put(np.array(a, copy=True), dev),
            np.asarray,
            lambda a: a.block_until_ready(),
        )
        return loaded

    return load


def _dask() -> Loaded:
    da = _import("dask.array", "Dask")
    import array_api_compat.dask.array as xp

    def asarray(a: np.ndarray) -> Any:
        # Split the batch axis in two so that every operation sees several chunks.
        chunks = tuple([max(1, -(-a.shape[0] // 2)), *a.shape[1:]]) if a.ndim else ()
        return da.from_array(np.array(a, copy=True), chunks=chunks)

    import dask

    return Loaded(
        "dask",
        xp,
        "cpu",
        asarray,
        np.asarray,
        lambda a: a.compute(),
        lambda arrays: list(dask.compute(*arrays)),
    )


def _cupy(index: int = 0) -> Callable[[], Loaded]:
    def load() -> Loaded:
        cp = _import("cupy", "CuPy")
        # is_available() is False when CuPy is installed but no GPU or driver is present.
        if not cp.is_available():
            raise BackendUnavailable(
                f"CuPy {cp.__version__} is installed but sees no CUDA GPU (no GPU, or no "
                "driver for its CUDA version)"
            )
        count = cp.cuda.runtime.getDeviceCount()
        if not 0 <= index < count:
            raise BackendUnavailable(
                f"CuPy sees {count} CUDA GPU(s), 0 to {count - 1}; there is no GPU {index}"
            )
        import array_api_compat.cupy as xp

        dev = cp.cuda.Device(index)

        def asarray(a: np.ndarray) -> Any:
            with dev:
                return cp.array(a, copy=True)

        def block(a: Any) -> Any:
            with dev:
                cp.cuda.get_current_stream().synchronize()
            return a

        # IEEE float32 products, whatever CUPY_TF32 says.
        precision.set_float32_matmul("ieee", "cupy")
        return Loaded("cupy", xp, dev, asarray, lambda a: a.get(), block)

    return load


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("numpy", False, _numpy(readonly=False)),
        Backend("numpy:readonly", False, _numpy(readonly=True)),
        Backend("array_api_strict", False, _array_api_strict(None)),
        Backend("array_api_strict:device1", False, _array_api_strict("device1")),
        Backend("torch", False, _torch("cpu")),
        Backend("jax", False, _jax("cpu")),
        Backend("dask", False, _dask),
        Backend("cupy", True, _cupy(0)),
        Backend("torch:cuda", True, _torch("cuda")),
        Backend("jax:gpu", True, _jax("gpu")),
    )
}
"""Every backend rnn_xp is tested on, CPU ones first."""


def for_run(name: str, device: str | None = None) -> Loaded:
    """The backend ``rnn-xp run`` and ``rnn-xp train`` use: a library and a device.

    ``device`` is a torch device string (``cpu``, ``cuda``, ``cuda:1``), a GPU
    index (``1``, the same as ``cuda:1``, for CuPy and torch; ``cuda`` is CuPy's
    GPU 0), or a JAX platform (``cpu``, ``gpu``); None means the library's
    default. A device that does not exist here raises `BackendUnavailable`
    before anything is allocated on it.
    """
    if device is not None and (not isinstance(device, str) or not device.strip()):
        raise BackendUnavailable(f"expected a device name such as cpu or cuda:0, got {device!r}")
    if name == "numpy":
        if device not in (None, "cpu"):
            raise BackendUnavailable(f"NumPy runs on the CPU only, not on {device!r}")
        return BACKENDS["numpy"].load()
    if name == "torch":
        if device is not None and device.isascii() and device.isdigit():  # a GPU index
            device = f"cuda:{device}"
        load = _torch(device or "cpu")
        return load() if (device or "cpu") == "cpu" else _checked_gpu("torch", load)
    if name == "jax":
        platforms = ("cpu", "gpu", "cuda", "rocm", "tpu")
        if device is not None and device not in platforms:
            raise BackendUnavailable(
                f"JAX devices are platform names ({', '.join(platforms)}), not {device!r}"
            )
        load = _jax(device or "cpu")
        return load() if (device or "cpu") == "cpu" else _checked_gpu("jax", load)
    if name == "cupy":
        text = "0" if device in (None, "cuda") else device.removeprefix("cuda:")
        if not (text.isascii() and text.isdigit()):
            raise BackendUnavailable(
                f"CuPy devices are GPU indices (0, 1, ... or cuda:N), not {device!r}"
            )
        return _checked_gpu("cupy", _cupy(int(text)))
    raise BackendUnavailable(f"unknown backend {name!r}")
