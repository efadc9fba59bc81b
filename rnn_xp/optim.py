"""Optimizers written once against the array API: SGD with gradient clipping, Adam, and a
dynamic loss scaler for float16 training.

Both work on dicts of parameters and gradients of any supported library and
return new parameter dicts; nothing is updated in place, so they run on JAX
arrays too. Clipping never reads the gradient norm back to the host: the norm
and the scale are 0-d arrays on the device, so a step queues its work without
waiting for the device (on a GPU every read of a device value is a
synchronisation), and Dask gradients stay lazy.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from . import _checks
from ._backends import on_input_device

Array = Any

__all__ = ["SGD", "Adam", "LossScaler", "clip_by_global_norm"]


def _plain(arrays: dict[Any, Array]) -> None:
    """Each value a plain real floating array (keys of any kind: names, indices)."""
    for k, a in arrays.items():
        _checks.real_floating(**{str(k): a})


@on_input_device
def clip_by_global_norm(
    grads: dict[Any, Array], max_norm: float | None
) -> tuple[dict[Any, Array], Array]:
    """Scale all gradients by ``max_norm / norm`` when their global L2 norm exceeds it.

    Parameters
    ----------
    grads : dict of arrays
        The gradients, of one library, any shapes, any real floating dtypes.
    max_norm : float or None
        The largest global norm let through; None: no clipping.

    Returns
    -------
    clipped : dict of arrays
        Each gradient times ``min(1, max_norm / (norm + 1e-12))``, in its own
        dtype; ``grads`` itself when ``max_norm`` is None.
    norm : array, shape ()
        The global L2 norm of ``grads`` before clipping, a 0-d array of their
        library, in float64 if any gradient is float64, else float32. It used
        to be a Python float; ``float(norm)`` gives that, and waits for the
        device.

    Notes
    -----
    The scale is applied whether or not the norm exceeds ``max_norm`` (below
    it, the scale is exactly 1), so that deciding never needs the norm on the
    host.
    """
    _plain(grads)  # np.matrix would square by matrix product
    xp = array_namespace(*grads.values())
    # In float16 a square overflows from |g| = 256 on, and long sums of
    # float16 or bfloat16 lose their small terms: square and sum in float32 at least.
    wide = any(g.dtype == xp.float64 for g in grads.values())
    acc = xp.float64 if wide else xp.float32
    squares = [xp.sum(a * a) for a in (xp.astype(g, acc, copy=False) for g in grads.values())]
    norm = xp.sqrt(xp.sum(xp.stack(squares)))
    if max_norm is None:
        return grads, norm
    # clip with a Python bound creates no array (CuPy would create it on the
    # current device, which need not be the gradients').
    scale = xp.clip(max_norm / (norm + 1e-12), max=1.0)
    cast: dict[Any, Array] = {}  # the scale in each gradient's dtype, cast once per dtype
    clipped = {}
    for k, g in grads.items():
        if g.dtype not in cast:
            cast[g.dtype] = xp.astype(scale, g.dtype)
        clipped[k] = g * cast[g.dtype]
    return clipped, norm


def _clipped(grads: dict[Any, Array], max_norm: float | None) -> dict[Any, Array]:
    if max_norm is None:  # no norm to compute
        _plain(grads)
        return grads
    return clip_by_global_norm(grads, max_norm)[0]


class SGD:
    """Plain stochastic gradient descent with optional clipping by global norm."""

    def __init__(self, lr: float = 0.1, max_norm: float | None = 5.0) -> None:
        self.lr, self.max_norm = lr, max_norm

    @on_input_device
    def step(self, params: dict[str, Array], grads: dict[str, Array]) -> dict[str, Array]:
        _plain(params)
        grads = _clipped(grads, self.max_norm)
        return {k: p - self.lr * grads[k] for k, p in params.items()}


class Adam:
    """Adam (Kingma & Ba, 2015) with optional clipping by global norm."""

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_norm: float | None = 5.0,
    ) -> None:
        self.lr, self.betas, self.eps, self.max_norm = lr, betas, eps, max_norm
        self.t = 0
        self.m: dict[str, Array] = {}
        self.v: dict[str, Array] = {}

    @on_input_device
    def step(self, params: dict[str, Array], grads: dict[str, Array]) -> dict[str, Array]:
        _plain(params)
        grads = _clipped(grads, self.max_norm)
        b1, b2 = self.betas
        self.t += 1
        new = {}
        for k, p in params.items():
            g = grads[k]
            m = (1 - b1) * g if k not in self.m else b1 * self.m[k] + (1 - b1) * g
            v = (1 - b2) * g * g if k not in self.v else b2 * self.v[k] + (1 - b2) * g * g
            self.m[k], self.v[k] = m, v
            xp = array_namespace(p)
            m_hat = m / (1 - b1**self.t)
            v_hat = v / (1 - b2**self.t)
            new[k] = p - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)
        return new


def _number(name: str, value: Any, low: float, high: float = float("inf")) -> float:
    """``value`` as a float in (low, high); ValueError naming ``name`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not low < value < high:
        raise ValueError(f"{name}: expected a number in ({low}, {high}), got {value!r}")
    return float(value)


class LossScaler:
    """Dynamic loss scaling for training in float16, written once for every library.

    float16 holds nothing below about 6e-8 (and nothing normal below 6e-5), so
    small gradients vanish; scaling the gradient that enters the backward by
    ``scale`` lifts them into range, and the step divides it out again. A step
    whose gradients overflowed (inf or NaN) is skipped and the scale backs off;
    after ``growth_interval`` finite steps in a row it grows. This is torch's
    ``GradScaler`` and optax's ``DynamicScale``. bfloat16 has float32's range
    and needs none.

    Use: ``dout = scaler.scale_gradient(dout)`` (and any ``dh_n``) before
    ``model.backward``, then ``params = scaler.step(optimizer, params, model.grads)``.

    Parameters
    ----------
    init_scale : float, default 2**15
    growth_factor : float, default 2
    backoff_factor : float, default 0.5
    growth_interval : int, default 2000
        Finite steps in a row before the scale grows.

    Attributes
    ----------
    scale : float
        The current scale, a Python float (the host decides, once per step).
    skipped : int
        How many steps were skipped so far.
    """

    def __init__(
        self,
        init_scale: float = 2.0**15,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.scale = _number("init_scale", init_scale, 0)
        self.growth_factor = _number("growth_factor", growth_factor, 1)
        self.backoff_factor = _number("backoff_factor", backoff_factor, 0, 1)
        interval = growth_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"growth_interval: expected a positive integer, got {interval!r}")
        self.growth_interval = interval
        self.skipped = 0
        self._good = 0  # finite steps in a row

    def scale_gradient(self, dout: Array) -> Array:
        """``dout * scale``: the gradient to give the backward, in ``dout``'s dtype."""
        _checks.real_floating(dout=dout)
        return dout * self.scale

    @on_input_device
    def step(self, optimizer: Any, params: dict[str, Array], grads: dict[str, Array]) -> dict:
        """Unscale ``grads``; step ``optimizer`` if all are finite, else skip; update the scale.

        Returns the new parameters (``params`` itself when the step is
        skipped: the optimizer's state is then untouched too). The gradients
        are unscaled in float32 at least, so a float16 gradient that is finite
        only scaled does not overflow back. Deciding reads one boolean from
        the device: the one synchronisation of the step.
        """
        _plain(params)
        _plain(grads)
        if set(grads) != set(params):
            raise ValueError(f"grads: expected the keys of params, got {sorted(map(str, grads))}")
        xp = array_namespace(*grads.values())
        unscaled = {}
        for k, g in grads.items():
            wide = g if g.dtype == xp.float64 else xp.astype(g, xp.float32)
            unscaled[k] = wide / self.scale
        finite = bool(xp.all(xp.stack([xp.all(xp.isfinite(g)) for g in unscaled.values()])))
        if not finite:
            self.scale *= self.backoff_factor
            self.skipped += 1
            self._good = 0
            return params
        new = optimizer.step(
            params, {k: xp.astype(g, params[k].dtype) for k, g in unscaled.items()}
        )
        self._good += 1
        if self._good >= self.growth_interval:
            self.scale *= self.growth_factor
            self._good = 0
        return new
