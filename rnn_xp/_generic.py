"""A public cell (`rnn_xp.cells.Cell`) as the time loop (`_scan`) runs it.

`_scan`'s own cells take ``(ax, state, Wh, bh)`` and return, for the backward,
the gradient of ``h_prev @ Wh + bh``, from which the loop gets ``dWh`` and
``dbh``. A public cell has parameters of its own instead: `Kernel` passes
them, as one dict, where ``Wh`` goes, and returns their per-step gradients as
a dict where ``dah`` goes; `Kernel.param_grads` then sums those over time,
each `Outer` as one matrix product over all N*T rows. Without a
``step_backward``, each step's backward is the library's own autodiff of
``step`` (`_autodiff`), recomputed from the step's inputs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

from . import _autodiff, _scan

Array = Any


class Outer(NamedTuple):
    """A step's parameter gradient ``left.T @ right``, left for the loop to compute.

    ``left`` is (N, a) and ``right`` (N, b). The loop stacks every step's
    factors and computes their sum over time as one (a, N*T) @ (N*T, b)
    product, which is what the built-in cells do for their recurrent weights:
    one large product instead of T small ones. (Public as `rnn_xp.cells.Outer`.)
    """

    left: Array
    right: Array


class Kernel:
    """`_scan`'s cell protocol over a public cell. Equal cells give equal kernels."""

    kind = "generic"  # no fused loop: `_fastpath` runs the generic or JAX loops
    generic = True

    def __init__(self, cell: Any, prepares: bool) -> None:
        self.cell = cell
        self.gates = int(cell.gates)
        self.n_states = len(cell.state_names)
        self.autodiff = getattr(cell, "step_backward", None) is None
        self.prepares = prepares  # the cell transforms the projection (default: identity)

    # JAX compiles a loop per kernel (a static argument): kernels are equal only
    # when their cells are of one class and equal, and run the same backward.
    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Kernel)
            and type(other.cell) is type(self.cell)
            and other.cell == self.cell
            and (other.autodiff, other.prepares) == (self.autodiff, self.prepares)
        )

    def __hash__(self) -> int:
        return hash((Kernel, type(self.cell), self.cell, self.autodiff, self.prepares))

    def __repr__(self) -> str:
        return f"Kernel({self.cell!r})"

    def check_backward(self, xp: ModuleType) -> None:
        """TypeError, before any work, when ``xp`` cannot differentiate a cell without backward."""
        if self.autodiff and not _autodiff.available(xp):
            raise TypeError(
                f"cell: {type(self.cell).__name__} defines no step_backward, and "
                f"{xp.__name__.removeprefix('array_api_compat.')} has no automatic "
                "differentiation to derive it from step (torch and JAX have); define "
                "step_backward (and prepare_backward if it defines prepare) to run its "
                "backward here"
            )

    # -- forward ---------------------------------------------------------------

    def prepare(self, xp: ModuleType, ax: Array, params: dict, keep: bool) -> tuple[Array, Any]:
        """The cell's transform of the whole projection (N, T, G), and what its backward needs."""
        if not self.prepares:
            return ax, None
        out, saved = self.cell.prepare(xp, ax, params)
        return out, ((ax,) if self.autodiff else saved) if keep else None

    def step(self, xp: ModuleType, ax: Array, state: tuple, params: dict, bh: None):
        new, saved = self.cell.step(xp, ax, state, params)
        _check_like("step", "new state", new, state)
        return new, ((ax, tuple(state)) if self.autodiff else saved)

    # -- backward --------------------------------------------------------------

    def step_backward(self, xp: ModuleType, dstate: tuple, saved: Any, params: dict):
        """``(dstate_prev, dax, dparams)``: ``dparams`` holds this step's parameter gradients."""
        if self.autodiff:
            ax, state = saved

            def step(a, s, p):
                return tuple(self.cell.step(xp, a, s, p)[0])

            dax, dprev, dparams = _autodiff.vjp(xp, step, (ax, state, params), tuple(dstate))
            return tuple(dprev), dax, dict(dparams)
        out = self.cell.step_backward(xp, tuple(dstate), saved, params)
        if not isinstance(out, tuple) or len(out) != 3 or not isinstance(out[2], dict):
            raise TypeError(
                f"cell: {type(self.cell).__name__}.step_backward: expected a tuple "
                "(dstate_prev, dax, dparams) with dparams a dict"
            )
        dprev, dax, dparams = out
        _check_like("step_backward", "dstate_prev", dprev, dstate)
        return dprev, dax, dparams

    def param_grads(self, xp: ModuleType, dax3: Array, dsteps: Any, tape: Any):
        """``(dax3, dparams)``: the projection's gradient and every parameter's, over all steps.

        ``dsteps`` is a list of per-step dicts (the generic loop), or one dict
        of (N, T, ...) factors and (..., T, ...) gradients (the JAX scan).
        """
        params = tape.Wh
        who = f"cell: {type(self.cell).__name__}"
        if tuple(dax3.shape) != (*tape.xs.shape[:2], tape.Wx.shape[1]):
            raise ValueError(
                f"{who}.step_backward: dax of shape {(dax3.shape[0], dax3.shape[-1])} per "
                f"step; expected (N, gates*H) = {(tape.xs.shape[0], tape.Wx.shape[1])}"
            )
        first = dsteps if tape.stacked else (dsteps[0] if dsteps else {})
        unknown = sorted(set(first) - set(params))
        if unknown:
            raise ValueError(f"{who}.step_backward: gradients of unknown parameters {unknown}")
        grads: dict[str, Array] = {}
        for name in params:
            grads[name] = _over_time(xp, who, name, dsteps, tape.stacked)
        if not self.prepares:
            dpre: Any = {}
        elif self.autodiff:
            (ax,) = tape.pre

            def prepare(a, p):
                return self.cell.prepare(xp, a, p)[0]

            dax3, dpre = _autodiff.vjp(xp, prepare, (ax, params), dax3)
        else:
            dax3, dpre = self.cell.prepare_backward(xp, dax3, tape.pre, params)
        for name, g in dict(dpre).items():
            if name not in params:
                raise ValueError(f"{who}.prepare_backward: a gradient of unknown {name!r}")
            if g is not None:
                grads[name] = g if grads.get(name) is None else grads[name] + g
        for name, g in grads.items():
            if g is not None and tuple(g.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"{who}: the gradient of {name!r} has shape {tuple(g.shape)}, summed over "
                    f"the steps; expected the parameter's {tuple(params[name].shape)}"
                )
        # A parameter no step gave a gradient of has gradient zero.
        return dax3, {
            k: g if g is not None else xp.zeros_like(params[k]) for k, g in grads.items()
        }


def _check_like(where: str, what: str, got: Any, like: tuple) -> None:
    """``got``, from a cell's ``where``: a tuple of arrays shaped and typed like ``like``."""
    if (
        isinstance(got, tuple)
        and len(got) == len(like)
        and all(
            getattr(g, "shape", None) == a.shape and getattr(g, "dtype", None) == a.dtype
            for g, a in zip(got, like)
        )
    ):
        return
    expected = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in like)
    if isinstance(got, tuple):
        shown = ", ".join(
            f"{tuple(g.shape)} {g.dtype}" if hasattr(g, "shape") else type(g).__name__ for g in got
        )
    else:
        shown = type(got).__name__
    raise TypeError(
        f"cell: {where} returned as {what} ({shown}); expected a tuple of {len(like)} "
        f"arrays ({expected})"
    )


def _over_time(xp: ModuleType, who: str, name: str, dsteps: Any, stacked: bool) -> Array | None:
    """One parameter's gradient: its steps' gradients summed, each `Outer` as one product."""
    if stacked:
        g = dsteps.get(name)
        if g is None:
            return None
        if isinstance(g, Outer):
            return _scan.reduction_matmul(xp)(_rows(xp, g.left).T, _rows(xp, g.right))
        return xp.sum(g, axis=1)  # the JAX scan's time axis, moved to 1
    steps = [d.get(name) for d in dsteps if d.get(name) is not None]
    if not steps:
        return None
    if len({isinstance(g, Outer) for g in steps}) > 1:
        raise TypeError(
            f"{who}.step_backward: the gradient of {name!r} is an Outer at some steps and an "
            "array at others; give one kind at every step"
        )
    if isinstance(steps[0], Outer):
        left = xp.concat([o.left for o in steps], axis=0)
        right = xp.concat([o.right for o in steps], axis=0)
        return _scan.reduction_matmul(xp)(left.T, right)
    return xp.sum(xp.stack(steps, axis=0), axis=0)


def _rows(xp: ModuleType, a: Array) -> Array:
    return xp.reshape(a, (-1, a.shape[-1]))
