"""Input validation shared by every public entry point.

Each check names the offending argument and says what was expected and what was
received. Shape and device problems raise `ValueError`; library and dtype
problems raise `TypeError`. Nothing here copies or modifies an input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj, is_dask_namespace

from ._backends import refusal

__all__ = [
    "check_bias",
    "check_shape",
    "common",
    "common_chunked",
    "sum_to_shape",
]


def common(**arrays: Any) -> tuple[ModuleType, Any, Any]:
    """Validate the arrays of one call and return ``(xp, dtype, device)``.

    ``arrays`` maps argument names to arrays, or to None for an omitted optional
    argument. The namespace is inferred once here; the computation dtype is the
    result type of all the arrays, which must be real floating.
    """
    return _common(arrays, op_by_op=True)


def common_chunked(**arrays: Any) -> tuple[ModuleType, Any, Any]:
    """`common` for a call that runs one task per Dask chunk: chunks of any library."""
    return _common(arrays, op_by_op=False)


def _common(arrays: dict[str, Any], op_by_op: bool) -> tuple[ModuleType, Any, Any]:
    given = {name: a for name, a in arrays.items() if a is not None}
    xp = _namespace(given)
    for name, a in given.items():
        _check_array(name, xp, a)
    dev = _common_device(given)
    if op_by_op and is_dask_namespace(xp):
        _numpy_chunks(given)
    return xp, xp.result_type(*given.values()), dev


def _numpy_chunks(given: dict[str, Any]) -> None:
    """Dask arrays that run op by op (training, backward) must hold NumPy chunks.

    That path creates arrays with Dask's own functions, whose chunks are NumPy:
    mixed with CuPy chunks they would fail inside a worker, far from the call.
    Chunks of other libraries run only one task per chunk, in inference.
    """
    for name, a in given.items():
        meta = getattr(a, "_meta", None)
        if meta is not None and type(meta) is not np.ndarray:
            kind = f"{type(meta).__module__}.{type(meta).__name__}"
            raise TypeError(
                f"{name}: a Dask array of {kind} chunks runs only where each chunk runs as "
                "one task (rnn_forward, RNNLayer.forward, lstm_forward and gru_forward with "
                "inference=True, Recurrent.forward of a NumPy model in eval mode); training "
                "and every backward need NumPy chunks, or the arrays of that library themselves"
            )


def real_floating(**arrays: Any) -> None:
    """Each array (of any library, each by its own namespace) is real floating."""
    for name, a in arrays.items():
        if a is not None:
            _check_array(name, None, a)


def _check_array(name: str, xp: ModuleType | None, a: Any) -> None:
    """``a`` is a plain real floating array (of ``xp``, or of its own namespace if None)."""
    # array_namespace lets Python scalars through; an RNN input never is one.
    if type(a) in (bool, int, float, complex):
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    _check_plain(name, a)
    if xp is None:
        if not is_array_api_obj(a):
            got = f"{type(a).__module__}.{type(a).__name__}"
            raise TypeError(f"{name}: expected an array, got {got}")
        xp = array_namespace(a)
    if not _real_floating(xp, a.dtype):
        raise TypeError(
            f"{name}: expected a real floating dtype (such as float32 or float64), got {a.dtype}"
        )


def _real_floating(xp: ModuleType, dtype: Any) -> bool:
    # isdtype costs microseconds on NumPy; a call checks several arrays and
    # dtypes repeat, so remember the answers (dtypes of every supported
    # library are hashable; an unhashable one is simply not cached).
    try:
        return _REAL_FLOATING[xp, dtype]
    except KeyError:
        answer = _REAL_FLOATING[xp, dtype] = bool(xp.isdtype(dtype, "real floating"))
        return answer
    except TypeError:
        return bool(xp.isdtype(dtype, "real floating"))


_REAL_FLOATING: dict = {}


def _namespace(given: dict[str, Any]) -> ModuleType:
    # The namespace array_namespace infers depends only on the arrays' types,
    # and inferring it costs microseconds per array: remember it per tuple of
    # types (a failure is never cached, and raises with the argument's name).
    key = tuple(map(type, given.values()))
    try:
        return _NAMESPACES[key]
    except KeyError:
        pass
    try:
        xp = array_namespace(*given.values())
    except TypeError:
        _raise_namespace_error(given)
    _NAMESPACES[key] = xp
    return xp


_NAMESPACES: dict = {}


def _raise_namespace_error(given: dict[str, Any]) -> None:
    first_name = first_xp = None
    for name, a in given.items():
        if not is_array_api_obj(a):
            raise TypeError(
                f"{name}: expected an array, got {type(a).__module__}.{type(a).__name__}"
            )
        xp = array_namespace(a)
        if first_xp is None:
            first_name, first_xp = name, xp
        elif xp is not first_xp:
            raise TypeError(
                f"{name}: expected an array of the same library as {first_name} "
                f"({first_xp.__name__}), got {type(a).__module__}.{type(a).__name__}"
            )
    raise TypeError(
        f"cannot infer one array namespace from {', '.join(given)}"
    )  # pragma: no cover


def _common_device(given: dict[str, Any]) -> Any:
    # JAX tracers report no device (None): they are placed by JAX itself, so
    # they neither set nor contradict the device of the call.
    first_name = first_dev = None
    for name, a in given.items():
        dev = _device_of(a)
        if dev is None:
            continue
        if first_dev is None:
            first_name, first_dev = name, dev
        # CuPy devices are not hashable, so compare pairwise rather than in a set.
        elif dev != first_dev:
            raise ValueError(
                f"{name}: expected an array on the same device as {first_name} "
                f"({first_dev}), got one on {dev}"
            )
    return first_dev


def _device_of(a: Any) -> Any:
    # The standard's ``array.device`` attribute is the cheap answer;
    # array_api_compat's device() covers the arrays that lack it (Dask, NumPy
    # 1.x, JAX tracers, whose attribute lookup fails) or have a method instead.
    dev = getattr(a, "device", None)
    return device(a) if dev is None or callable(dev) else dev


def _format(spec: Sequence[tuple[str, int | None]]) -> str:
    dims = [label if size is None else f"{label}={size}" for label, size in spec]
    return "(" + ", ".join(dims) + (",)" if len(dims) == 1 else ")")


def check_shape(
    name: str,
    a: Any,
    spec: Sequence[tuple[str, int | None]],
    why: str | Callable[[], str] = "",
) -> None:
    """Check that ``a`` has ``len(spec)`` axes whose sizes match ``spec``.

    ``spec`` is a sequence of ``(label, size)``; a size of None accepts any size.
    ``why`` explains where the sizes come from; a callable is only called to
    build the message of a failure, which keeps a passing check cheap.
    """
    shape = tuple(a.shape)
    ok = len(shape) == len(spec)
    for (_, size), got in zip(spec, shape):
        ok = ok and (size is None or got == size)
    if not ok:
        why = why() if callable(why) else why
        why = f" {why}" if why else ""
        raise ValueError(f"{name}: expected shape {_format(spec)}{why}, got {shape}")


def check_bias(name: str, b: Any, N: int, H: int) -> None:
    """Check that ``b`` broadcasts to ``(N, H)``: (H,), (1, H), (N, H), () and so on."""
    shape = tuple(b.shape)
    target = (N, H)
    if len(shape) > 2 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(
            f"{name}: expected a shape that broadcasts to (N={N}, H={H}), such as (H={H},) "
            f"or (N={N}, H={H}), got {shape}"
        )


def sum_to_shape(xp: ModuleType, g: Any, shape: tuple[int, ...]) -> Any:
    """Reduce ``g`` over the axes that broadcasting ``shape`` to ``g.shape`` added."""
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1
    )
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    return xp.reshape(g, shape) if lead else g


def _check_plain(name: str, a: Any) -> None:
    why = refusal(a)
    if why is not None:
        raise TypeError(f"{name}: expected a plain array, got {why}; pass np.asarray({name})")


def check_companion(name: str, a: Any, xp: ModuleType, dev: Any, kind: str) -> None:
    """Check an index-like input (lengths, masks): an array of ``xp`` on ``dev``, of ``kind``.

    ``kind`` is an array-API dtype kind such as ``"bool"`` or ``"integral"``.
    """
    _check_plain(name, a)
    if not is_array_api_obj(a) or type(a) in (bool, int, float, complex):
        raise TypeError(f"{name}: expected an array, got {type(a).__module__}.{type(a).__name__}")
    if array_namespace(a) is not xp:
        raise TypeError(
            f"{name}: expected an array of the same library as xs ({xp.__name__}), "
            f"got {type(a).__module__}.{type(a).__name__}"
        )
    if not xp.isdtype(a.dtype, kind):
        expected = "a boolean" if kind == "bool" else "an integer"
        raise TypeError(f"{name}: expected {expected} dtype, got {a.dtype}")
    got = device(a)
    if dev is not None and got is not None and got != dev:
        raise ValueError(
            f"{name}: expected an array on the same device as xs ({dev}), got one on {got}"
        )
