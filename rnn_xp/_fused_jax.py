"""JAX's fast path: forward and backward each one ``jax.lax.scan``, masks included.

The scans run the cells' own ``step`` and ``step_backward``, so the loop is
traced once, and compile time under ``jax.jit`` does not grow with T. Each is
compiled once per cell, shape and dtype (`_jax_scans`). The results are
stacked, time on the leading axis of the scan and then moved to axis 1.

The recurrent weights ``Wh`` may be any pytree (a dict of arrays, say) and
``bh`` None: both are ordinary traced arguments. So may the per-step gradients
``dax`` and ``dah`` that ``step_backward`` returns; each of their arrays comes
back as (N, T, ...).

jax itself is imported only when a scan is first needed.
"""

from __future__ import annotations

import functools
from typing import Any

from . import _mixed


def forward(cell: Any, ax, Wh, bh, state0, mask3, reverse: bool, keep: bool, policy=None):
    """``(outs, state_n, saved, h_prev)`` of one direction from the projection ``ax``.

    ``policy``: a `rnn_xp.precision.Policy` whose products the steps use, or None.
    """
    forward_scan, _ = _jax_scans()
    state, outs, saved, h_prev = forward_scan(
        ax, Wh, bh, tuple(state0), mask3, cell=cell, reverse=reverse, keep=keep, policy=policy
    )
    return outs, state, saved, h_prev


def backward(cell: Any, tape: Any, douts, dstate, policy=None):
    """The backward of `forward`: ``(dax3, dah3, dstate0, h_prev3)``, batch-major."""
    _, backward_scan = _jax_scans()
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
    )


@functools.cache
def _jax_scans():
    # jit with the cell and the flags static: a call with the same cell kind,
    # shapes and dtypes reuses the compiled loop instead of tracing it again.
    # Everything else is traced, Wh and bh included: any pytree, None too.
    import jax
    import jax.numpy as jnp

    def namespace(policy):
        return jnp if policy is None else _mixed.namespace(jnp, policy)

    def forward_scan(ax, Wh, bh, state0, mask3, *, cell, reverse, keep, policy):
        xp = namespace(policy)

        def body(state, inputs):
            a_t, m = inputs
            new, saved = cell.step(xp, a_t, state, Wh, bh)
            if m is None:
                nxt, out = new, new[0]
            else:
                nxt = tuple(jnp.where(m, a, b) for a, b in zip(new, state))
                out = jnp.where(m, new[0], 0)
            return nxt, (out, saved if keep else None, state[0] if keep else None)

        masks = None if mask3 is None else jnp.moveaxis(mask3, 1, 0)
        state, (outs, saved, h_prev) = jax.lax.scan(
            body, state0, (jnp.moveaxis(ax, 1, 0), masks), reverse=reverse
        )
        return state, jnp.moveaxis(outs, 0, 1), saved, h_prev

    def backward_scan(douts, dstate, saved, h_prev, mask3, Wh, *, cell, reverse, policy):
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
            return dprev, (dax, dah)

        masks = None if mask3 is None else jnp.moveaxis(mask3, 1, 0)
        dstate0, (dax, dah) = jax.lax.scan(
            body, dstate, (jnp.moveaxis(douts, 1, 0), saved, masks), reverse=not reverse
        )
        move = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731
        # A generic cell's per-step gradients may be pytrees: each array moves.
        dax, dah = jax.tree_util.tree_map(move, (dax, dah))
        return dax, dah, dstate0, move(h_prev)

    return (
        jax.jit(forward_scan, static_argnames=("cell", "reverse", "keep", "policy")),
        jax.jit(backward_scan, static_argnames=("cell", "reverse", "policy")),
    )
