"""JAX's fast path: forward and backward each one ``jax.lax.scan``, masks included.

The scans run the cells' own ``step`` and ``step_backward``, so the loop is
traced once, and compile time under ``jax.jit`` does not grow with T. Each is
compiled once per cell, shape and dtype (`_jax_scans`). The results are
stacked, time on the leading axis of the scan; the outputs are moved to axis 1.

On the CPU, `forward_projecting` multiplies each step's input inside the scan
(``x_t @ Wx + bx``) instead of taking the whole projection, and the backward
returns its gate gradients time-major, for `rnn_xp._scan` to reduce as they
are. Both are what XLA's CPU backend runs fastest (BENCHMARKS.md, "Ahead of
each library's own RNN"): it runs the two products of a step, which do not
depend on each other, at once on two threads, and the hoisted projection cost
two passes over a (N, T, G) array to make it time-major. The steps' sigmoid is
``jax.nn.sigmoid`` (XLA's logistic), through `StepNamespace`.

The recurrent weights ``Wh`` may be any pytree (a dict of arrays, say) and
``bh`` None: both are ordinary traced arguments. So may the per-step gradients
``dax`` and ``dah`` that ``step_backward`` returns; each of their arrays comes
back as (N, T, ...).

jax itself is imported only when a scan is first needed.
"""

from __future__ import annotations

import functools
from typing import Any

from . import _activations, _mixed


class StepNamespace:
    """``xp`` (``jax.numpy``, or it under a precision policy) as the scans' steps see it.

    Every name is ``xp``'s own; ``rnn_xp_sigmoid`` is ``jax.nn.sigmoid`` (for
    float32 and float64), which `rnn_xp._activations.sigmoid` uses where a namespace
    has it (the generic loop's namespaces do not).
    """

    def __init__(self, xp: Any) -> None:
        import jax

        self.base_namespace = xp
        self.__name__ = xp.__name__

        def sigmoid(a):
            # 16-bit floats keep the generic loop's formula: the two round differently.
            if a.dtype.itemsize < 4:
                return _activations.tanh_sigmoid(xp, a)
            return jax.nn.sigmoid(a)

        self.rnn_xp_sigmoid = sigmoid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base_namespace, name)


def projects_per_step(xs) -> bool:
    """Whether `forward_projecting` pays for ``xs``: on the CPU.

    Under ``jax.jit`` (``xs`` a tracer) the default backend's device decides.
    """
    import jax

    if isinstance(xs, jax.core.Tracer):
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in xs.devices())


def forward(cell: Any, ax, Wh, bh, state0, mask3, reverse: bool, keep: bool, policy=None):
    """``(outs, state_n, saved, h_prev)`` of one direction from the projection ``ax``.

    ``policy``: a `rnn_xp.precision.Policy` whose products the steps use, or None.
    """
    forward_scan = _jax_scans()[0]
    state, outs, saved, h_prev = forward_scan(
        ax, Wh, bh, tuple(state0), mask3, cell=cell, reverse=reverse, keep=keep, policy=policy
    )
    return outs, state, saved, h_prev


def forward_projecting(
    cell: Any, xs, Wx, bx, Wh, bh, state0, mask3, reverse: bool, keep: bool, policy=None
):
    """`forward` from ``xs`` (N, T, D): each step's ``x_t @ Wx + bx`` inside the scan."""
    projecting_scan = _jax_scans()[2]
    state, outs, saved, h_prev = projecting_scan(
        xs,
        Wx,
        bx,
        Wh,
        bh,
        tuple(state0),
        mask3,
        cell=cell,
        reverse=reverse,
        keep=keep,
        policy=policy,
    )
    return outs, state, saved, h_prev


def backward(cell: Any, tape: Any, douts, dstate, policy=None, time_major: bool = False):
    """The backward of `forward`: ``(dax3, dah3, dstate0, h_prev3)``.

    Batch-major (N, T, ...), or time-major (T, N, ...) with ``time_major``.
    """
    backward_scan = _jax_scans()[1]
    return backward_scan(
        douts,
        tuple(dstate),
        tape.saved,
        tape.h_prev,
        tape.mask,
        tape.Wh,
        cell=cell,
        reverse=tape.reverse,
        policy=policy,
        time_major=time_major,
    )


@functools.cache
def _jax_scans():
    # jit with the cell and the flags static: a call with the same cell kind,
    # shapes and dtypes reuses the compiled loop instead of tracing it again.
    # Everything else is traced, Wh and bh included: any pytree, None too.
    import jax
    import jax.numpy as jnp

    def namespace(policy):
        return StepNamespace(jnp if policy is None else _mixed.namespace(jnp, policy))

    def scan_steps(cell, xp, Wh, bh, state0, inputs, mask3, reverse, keep, project):
        """The forward scan over the steps of ``inputs`` (N, T, K), batch-major.

        Step t slices ``inputs[:, t]``, which ``project`` turns into its ``ax``,
        and writes its output into an (N, T, H) buffer that the scan carries:
        neither needs a time-major copy (measured: up to 7% of the forward).
        """
        N, T = inputs.shape[:2]
        h0 = state0[0]

        def at(a, t):
            return jax.lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False)

        # Where ``saved`` holds the step's h_prev itself (the GRU's); found when traced.
        kept_h = []

        def body(carry, t):
            state, outs = carry
            new, saved = cell.step(xp, project(at(inputs, t)), state, Wh, bh)
            if mask3 is None:
                nxt, out = new, new[0]
            else:
                m = at(mask3, t)
                nxt = tuple(jnp.where(m, a, b) for a, b in zip(new, state))
                out = jnp.where(m, new[0], 0)
            outs = jax.lax.dynamic_update_index_in_dim(outs, out, t, axis=1)
            if not keep:
                return (nxt, outs), (None, None)
            parts = saved if isinstance(saved, tuple) else ()
            kept_h.append(next((k for k, a in enumerate(parts) if a is state[0]), None))
            # Stack h_prev once: a second copy of the same array costs a write a step.
            return (nxt, outs), (saved, state[0] if kept_h[-1] is None else None)

        outs = jnp.zeros((N, T, h0.shape[1]), h0.dtype)
        (state, outs), (saved, h_prev) = jax.lax.scan(
            body, (state0, outs), jnp.arange(T), reverse=reverse
        )
        if keep and kept_h[-1] is not None:
            h_prev = saved[kept_h[-1]]
        return state, outs, saved, h_prev

    def forward_scan(ax, Wh, bh, state0, mask3, *, cell, reverse, keep, policy):
        xp = namespace(policy)
        return scan_steps(cell, xp, Wh, bh, state0, ax, mask3, reverse, keep, lambda a: a)

    def projecting_scan(xs, Wx, bx, Wh, bh, state0, mask3, *, cell, reverse, keep, policy):
        xp = namespace(policy)

        def project(x_t):
            a_t = xp.matmul(x_t, Wx)
            return a_t if bx is None else a_t + bx

        return scan_steps(cell, xp, Wh, bh, state0, xs, mask3, reverse, keep, project)

    def backward_scan(
        douts, dstate, saved, h_prev, mask3, Wh, *, cell, reverse, policy, time_major
    ):
        xp = namespace(policy)

        def body(dstate, inputs):
            d_t, saved_t, m = inputs
            dnew = (d_t + dstate[0], *dstate[1:])
            if m is None:
                dprev, dax, dah = cell.step_backward(xp, dnew, saved_t, Wh)
            else:
                dstep = tuple(jnp.where(m, d, 0) for d in dnew)
                dprev, dax, dah = cell.step_backward(xp, dstep, saved_t, Wh)
                dprev = tuple(p + jnp.where(m, 0, d) for p, d in zip(dprev, dstate))
            # The Elman and LSTM steps return one array as both: stack it once.
            same.append(dah is dax)
            return dprev, (dax, None if same[-1] else dah)

        same: list[bool] = []  # set when the body is traced
        masks = None if mask3 is None else jnp.moveaxis(mask3, 1, 0)
        dstate0, (dax, dah) = jax.lax.scan(
            body, dstate, (jnp.moveaxis(douts, 1, 0), saved, masks), reverse=not reverse
        )
        dah = dax if same[-1] else dah
        if time_major:
            return dax, dah, dstate0, h_prev
        move = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731
        # A generic cell's per-step gradients may be pytrees: each array moves.
        dax, dah = jax.tree_util.tree_map(move, (dax, dah))
        return dax, dah, dstate0, move(h_prev)

    forward_flags = ("cell", "reverse", "keep", "policy")
    return (
        jax.jit(forward_scan, static_argnames=forward_flags),
        jax.jit(backward_scan, static_argnames=("cell", "reverse", "policy", "time_major")),
        jax.jit(projecting_scan, static_argnames=forward_flags),
    )
