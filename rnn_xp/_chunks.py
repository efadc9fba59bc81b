"""Dask: one task per batch chunk, run by the same array-API code where the chunk lives.

Like `_fastpath`, this module knows which library an array comes from; with
``_fastpath.DISABLED`` set it steps aside too, so that the tests can compare it
with the generic, op-by-op path over Dask arrays.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

from array_api_compat import (
    device,
    is_array_api_obj,
    is_dask_array,
    is_numpy_array,
    is_numpy_namespace,
)

from . import _fastpath


def on_dask_chunks(
    fn,
    batched: dict[str, tuple[Any, int]],
    outputs: Any,
    static: dict[str, Any] | None = None,
):
    """Run ``fn(**blocks, **static)`` once per batch chunk of Dask arrays; lazy results.

    ``batched`` maps argument names to ``(array or None, batch axis)``; the
    first is the reference whose batch chunks every other array is aligned to,
    and whose other axes are made single chunks (a rechunk, never a gather).
    ``fn`` receives the chunks, arrays of whatever library the Dask chunks hold
    (NumPy, or CuPy on GPU workers), and returns one array per entry of
    ``outputs``, ``(batch axis, shape with None at the batch axis, dtype)``. The
    results are Dask arrays chunked like the reference along the batch axis.
    ``outputs`` may also be a function that validates the inputs and returns
    that list; it is called only once the reference is known to be a Dask
    array. ``static`` arguments (weights, of any library) go whole to every
    task; a Dask array among them becomes one block. Raises NotImplementedError
    unless the reference is a Dask array.
    """
    name0, (ref, axis0) = next(iter(batched.items()))
    if _fastpath.DISABLED or not is_dask_array(ref):
        raise NotImplementedError
    import dask
    import dask.array as da

    if callable(outputs):
        outputs = outputs()
    others = {k: v for k, v in batched.items() if v[0] is not None and k != name0}
    # NumPy arrays split along the batch (a bias of one row per sequence) are
    # split like the reference, as Dask arrays of their own.
    others = {
        k: (da.from_array(a) if is_numpy_array(a) else a, ax) for k, (a, ax) in others.items()
    }
    for name, (a, _) in others.items():
        if not is_dask_array(a):
            got = f"{type(a).__module__}.{type(a).__name__}"
            raise TypeError(f"{name}: expected a Dask array like {name0}, got {got}")
    ref = ref.rechunk({i: -1 for i in range(ref.ndim) if i != axis0})
    sizes = ref.chunks[axis0]
    aligned = {name0: (ref, axis0)} | {
        k: (a.rechunk({i: (sizes if i == ax else -1) for i in range(a.ndim)}), ax)
        for k, (a, ax) in others.items()
    }
    blocks = {k: a.to_delayed().ravel() for k, (a, _) in aligned.items()}
    whole: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    for k, a in (static or {}).items():
        if is_dask_array(a):
            whole[k] = a.rechunk(-1).to_delayed().ravel()[0]
        elif is_array_api_obj(a) and not is_numpy_array(a):
            got = f"{type(a).__module__}.{type(a).__name__}"
            raise TypeError(
                f"{k}: expected an array of the same library as {name0} "
                f"(dask.array, or NumPy for its chunks), got {got}"
            )
        elif isinstance(a, (type(None), bool, int, float, str)):
            whole[k] = a
        else:
            # One node of the graph, which every task shares: a worker receives
            # it once, and `resident` moves it to the worker's device once.
            # The key is the content's token: weights changed in place are a
            # new node, and a new copy on the device.
            token = dask.base.tokenize(a)
            whole[k] = dask.delayed(a, name=f"rnn-xp-{k}-{token}", traverse=False)
            tokens[k] = token
    task = dask.delayed(
        functools.partial(_on_chunk, fn, name0, tokens),
        nout=len(outputs) if len(outputs) > 1 else None,
        pure=True,
    )
    results = [task(**{k: b[i] for k, b in blocks.items()}, **whole) for i in range(len(sizes))]
    lazy = []
    for j, (axis, shape, dtype) in enumerate(outputs):
        meta = da.utils.meta_from_array(ref._meta, ndim=len(shape), dtype=dtype)
        parts = [
            da.from_delayed(
                r[j] if len(outputs) > 1 else r,
                shape=tuple(n if s is None else s for s in shape),
                dtype=dtype,
                meta=meta,
            )
            for r, n in zip(results, sizes)
        ]
        lazy.append(da.concatenate(parts, axis=axis))
    return lazy


def _on_chunk(fn, name0, tokens, **kwargs):
    """Call ``fn`` on one chunk, NumPy arguments moved into the chunk's library first."""
    from array_api_compat import array_namespace

    from ._backends import asarray

    chunk = kwargs[name0]
    xp = array_namespace(chunk)
    if not is_numpy_namespace(xp):  # CuPy chunks: weights sent as NumPy go to their GPU
        dev = device(chunk)
        kwargs = {
            k: resident(
                a,
                dev,
                lambda a=a: asarray(xp, a, getattr(xp, a.dtype.name), dev),
                tokens.get(k),
            )
            if is_numpy_array(a)
            else a
            for k, a in kwargs.items()
        }
    return fn(**kwargs)


_RESIDENT: dict[tuple[int, str], Any] = {}
_RESIDENT_LOCK = threading.Lock()


def resident(obj: Any, dev: Any, make: Callable[[], Any], token: str | None = None) -> Any:
    """``make()``, the copy of ``obj`` on ``dev``, made once per process while ``obj`` lives.

    The tasks of one worker share the graph's objects (weights, a model), so
    they move to the worker's device once, not once per chunk. ``token``
    names ``obj``'s content (Dask's token): an array changed in place since
    gets a new copy. Without it, ``obj`` must not change while it lives (the
    model each chunked call copies for its tasks).
    """
    key = (id(obj) if token is None else token, str(dev))
    with _RESIDENT_LOCK:
        if key in _RESIDENT:
            return _RESIDENT[key]
    made = make()
    with _RESIDENT_LOCK:
        if key not in _RESIDENT:
            _RESIDENT[key] = made
            weakref.finalize(obj, _RESIDENT.pop, key, None)
        return _RESIDENT[key]
