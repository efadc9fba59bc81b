"""What a model's forward makes of its inputs before the loop, on any library.

Lists of sequences of different lengths padded into one array and split back
(`padded`, `split`), ``lengths`` and ``mask`` made one (N, T) mask of valid
steps (`step_mask`), the dropout keep-masks between layers (`dropout_masks`),
and the checks of seeds and Python lengths. `rnn_xp.model.Recurrent` calls
these; none of them knows the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from . import _checks
from ._backends import arange, asarray, zeros

Array = Any


def generator(name: str, seed: Any) -> np.random.Generator:
    """``numpy.random.default_rng(seed)``, for None or a non-negative integer seed."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"{name}: expected None or a non-negative integer, got {seed!r}")
        if seed < 0:
            raise ValueError(f"{name}: expected None or a non-negative integer, got {seed}")
    return np.random.default_rng(seed)


def python_lengths(lengths: Sequence[Any]) -> tuple[int, ...]:
    """The ints of a list or tuple of lengths; TypeError naming ``lengths`` otherwise."""
    for v in lengths:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(
                f"lengths: expected an integer array or a sequence of ints, got an item {v!r} "
                f"of type {type(v).__name__}"
            )
    return tuple(int(v) for v in lengths)


def padded(
    name: str,
    seqs: Sequence[Array],
    label: str,
    F: int,
    batch_first: bool,
    known: tuple | None = None,
) -> tuple[ModuleType, Any, tuple[int, ...], Array]:
    """``(xp, device, lengths, padded)``: arrays (T_i, F) as one array in a model's layout.

    ``padded`` is (T, N, F), or (N, T, F) if ``batch_first``, T the longest
    T_i, zero after each sequence's end. With ``known`` the T_i must be those.
    """
    if len(seqs) == 0:
        raise ValueError(
            f"{name}: expected at least one sequence, got an empty {type(seqs).__name__}"
        )
    if known is not None and len(seqs) != len(known):
        raise ValueError(
            f"{name}: expected a list of {len(known)} arrays, one per sequence of the "
            f"forward, got {len(seqs)}"
        )
    named = {f"{name}[{i}]": a for i, a in enumerate(seqs)}
    xp, _, dev = _checks.common_chunked(**named)
    dtype = seqs[0].dtype
    for i, (key, a) in enumerate(named.items()):
        T_i = None if known is None else known[i]
        _checks.check_shape(key, a, [("T_i", T_i), (label, F)], "(one sequence of the list)")
        if a.dtype != dtype:
            raise TypeError(f"{key}: expected the dtype of {name}[0] ({dtype}), got {a.dtype}")
        if a.shape[0] < 1:
            raise ValueError(f"{key}: expected at least one time step, got shape {a.shape}")
    known = tuple(int(a.shape[0]) for a in seqs)
    T = max(known)
    pieces = []
    for a, T_i in zip(seqs, known):
        pieces.append(a)
        if T_i < T:
            pieces.append(zeros(xp, (T - T_i, F), dtype, dev))
    # One concatenation of (T_i, F) rows and their padding, read as (N, T, F).
    x = xp.reshape(xp.concat(pieces, axis=0), (len(seqs), T, F))
    return xp, dev, known, x if batch_first else xp.permute_dims(x, (1, 0, 2))


def split(xp: ModuleType, a: Array, known: tuple[int, ...], batch_first: bool) -> list[Array]:
    """The inverse of `padded`: each sequence's own steps, (T_i, features)."""
    a = a if batch_first else xp.permute_dims(a, (1, 0, 2))
    return [a[i, :T_i, :] for i, T_i in enumerate(known)]


def step_mask(
    xp: ModuleType,
    dev: Any,
    N: int,
    T: int,
    lengths: Array | None,
    mask: Array | None,
    known: tuple[int, ...] | None = None,
) -> Array | None:
    """The (N, T) bool mask of valid steps, or None when every step is valid.

    ``known``: the lengths as Python ints, when they were given so; their
    range is then checked without reading the array back.
    """
    if lengths is not None and mask is not None:
        raise ValueError("lengths, mask: expected one of them, got both")
    if mask is not None:
        _checks.check_companion("mask", mask, xp, dev, "bool")
        _checks.check_shape("mask", mask, [("N", N), ("T", T)])
        return mask
    if lengths is None:
        return None
    _checks.check_companion("lengths", lengths, xp, dev, "integral")
    _checks.check_shape("lengths", lengths, [("N", N)])
    wrapped = None
    if xp.isdtype(lengths.dtype, "unsigned integer"):
        # torch has almost no operations on uint16/32/64, and array_api_strict
        # does not compare them with the int64 steps below. uint64 lengths
        # of 2**63 or more wrap to negative: they are beyond T, and stay so.
        big = lengths.dtype == xp.uint64
        lengths = xp.astype(lengths, xp.int64)
        if big:
            wrapped = lengths < 0
            lengths = xp.where(wrapped, xp.zeros_like(lengths) + (T + 1), lengths)
    # One host round trip per call, before the loop, to reject bad lengths.
    try:
        if known is not None:
            low, high, huge = min(known, default=1), max(known, default=T), False
        else:
            low, high = (int(xp.min(lengths)), int(xp.max(lengths))) if N else (1, T)
            huge = wrapped is not None and N and bool(xp.any(wrapped))
    except TypeError:
        # Abstract values (traced by jax.jit): they cannot be read here. The
        # mask below is still defined: a length beyond T keeps every step,
        # one below 1 none.
        low, high, huge = 1, T, False
    if low < 1 or high > T:
        raise ValueError(
            f"lengths: expected every length in [1, T={T}], got values from {low} to "
            f"{'2**63 or more' if huge else high}"
        )
    return xp.expand_dims(arange(xp, T, dev), axis=0) < xp.expand_dims(lengths, axis=1)


def dropout_masks(
    xp: ModuleType,
    dtype: Any,
    dev: Any,
    shape: tuple[int, int, int],
    p: float,
    n: int,
    batch_first: bool,
    seed: int | None,
    masks: list[Array] | None,
) -> list[Array]:
    """``n`` scaled keep-masks (N, T, F), batch-major, from ``seed`` or the caller's ``masks``.

    ``masks`` are bool, (N, T, F) if ``batch_first`` else (T, N, F); kept
    values are scaled by 1/(1-p).
    """
    N, T, F = shape
    scale = 1 / (1 - p)
    if masks is None:
        if seed is None:
            raise ValueError(
                f"dropout_seed, dropout_masks: dropout={p} in training mode needs "
                "one of them (or call eval())"
            )
        rng = generator("dropout_seed", seed)
        drawn = [rng.random((N, T, F)) >= p for _ in range(n)]
        return [asarray(xp, scale * m, dtype, dev) for m in drawn]
    if len(masks) != n:
        raise ValueError(f"dropout_masks: expected {n} masks, got {len(masks)}")
    labels = [("N", N), ("T", T), ("F", F)] if batch_first else [("T", T), ("N", N), ("F", F)]
    scaled = []
    for m in masks:
        _checks.check_companion("dropout_masks", m, xp, dev, "bool")
        _checks.check_shape("dropout_masks", m, labels)
        m = m if batch_first else xp.permute_dims(m, (1, 0, 2))
        scaled.append(xp.astype(m, dtype) * scale)
    return scaled
