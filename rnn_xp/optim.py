"""Optimizers written once against the array API: SGD with gradient clipping, and Adam.

Both work on dicts of parameters and gradients of any supported library and
return new parameter dicts; nothing is updated in place, so they run on JAX
arrays too. The global gradient norm used for clipping is computed on the
device; only the clipping decision needs it on the host, once per step.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from . import _checks

Array = Any

__all__ = ["SGD", "Adam", "clip_by_global_norm"]


def _plain(arrays: dict[Any, Array]) -> None:
    """Each value a plain real floating array (keys of any kind: names, indices)."""
    for k, a in arrays.items():
        _checks.real_floating(**{str(k): a})


def clip_by_global_norm(grads: dict[str, Array], max_norm: float | None) -> tuple[dict, float]:
    """Scale all gradients by ``max_norm / norm`` when their global L2 norm exceeds it."""
    _plain(grads)  # np.matrix would square by matrix product
    xp = array_namespace(*grads.values())
    norm = math.sqrt(sum(float(xp.sum(g * g)) for g in grads.values()))
    if max_norm is None or norm <= max_norm:
        return grads, norm
    scale = max_norm / (norm + 1e-12)
    return {k: g * scale for k, g in grads.items()}, norm


class SGD:
    """Plain stochastic gradient descent with optional clipping by global norm."""

    def __init__(self, lr: float = 0.1, max_norm: float | None = 5.0) -> None:
        self.lr, self.max_norm = lr, max_norm

    def step(self, params: dict[str, Array], grads: dict[str, Array]) -> dict[str, Array]:
        _plain(params)
        grads, _ = clip_by_global_norm(grads, self.max_norm)
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

    def step(self, params: dict[str, Array], grads: dict[str, Array]) -> dict[str, Array]:
        _plain(params)
        grads, _ = clip_by_global_norm(grads, self.max_norm)
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
