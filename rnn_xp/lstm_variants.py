"""Three LSTM variants, each a `rnn_xp.cells.Cell` with an analytic backward.

Gates are stacked in torch's order i, f, g, o; ``A`` below is the (N, 4H) sum of
the input projection and the recurrent product, as in `rnn_xp.lstm`.

* `ProjectedLSTMCell`, torch's ``nn.LSTM(proj_size=P)``: ``h_t = (o * tanh(c_t)) @ W_hr.T``,
  ``weight_hr`` (P, H); h is P wide, c is H wide, ``weight_hh`` is (4H, P).
* `PeepholeLSTMCell` (Gers, Schraudolph and Schmidhuber 2002): diagonal
  peepholes from ``c_{t-1}`` into i and f and from ``c_t`` into o::

      i = sigmoid(A_i + w_ci * c_{t-1});  f = sigmoid(A_f + w_cf * c_{t-1})
      c_t = f * c_{t-1} + i * tanh(A_g);  o = sigmoid(A_o + w_co * c_t)

* `LayerNormLSTMCell` (Ba, Kiros and Hinton 2016, as haste's LayerNormLSTM):
  layer norm, each with a gain and a shift, on the input projection (over all
  N*T rows at once, before the loop), on the recurrent product and on the cell
  state before the output tanh::

      A = LN(x W_ih^T; g_ih, b_ih') + LN(h W_hh^T; g_hh, b_hh') + bias
      c_t = f * c_{t-1} + i * g;  h_t = o * tanh(LN(c_t; g_c, b_c'))

  with ``LN(a; g, b) = g * (a - mean(a)) / sqrt(var(a) + 1e-5) + b`` over the
  features of each row (4H for the gates, H for the cell).

None has a fused loop: they run on the generic loop (and JAX's ``lax.scan``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._activations import sigmoid
from .cells import Cell, Outer, Param

Array = Any

__all__ = ["LayerNormLSTMCell", "PeepholeLSTMCell", "ProjectedLSTMCell"]

EPS = 1e-5


def _lstm_params(D: int, H: int, hidden_in: int) -> dict[str, Param]:
    return {
        "weight_ih": Param((4 * H, D)),
        "weight_hh": Param((4 * H, hidden_in)),
        "bias_ih": Param((4 * H,), bias=True),
        "bias_hh": Param((4 * H,), bias=True),
    }


def _gates(xp: ModuleType, A: Array, H: int) -> tuple[Array, Array, Array, Array]:
    return (
        A[:, :H],
        A[:, H : 2 * H],
        xp.tanh(A[:, 2 * H : 3 * H]),
        A[:, 3 * H :],
    )


def _recurrent(xp: ModuleType, h: Array, ax: Array, params: dict) -> Array:
    A = ax + xp.matmul(h, params["weight_hh"].T)
    b = params.get("bias_hh")
    return A if b is None else A + b


def _dsigmoid(s: Array) -> Array:
    return s * (1 - s)


def _gates_backward(xp: ModuleType, dc: Array, do: Array, i, f, g, o, c_prev) -> Array:
    """The gradient of the gate block A (i, f, g, o) from those of ``c_t`` and of ``o``."""
    return xp.concat(
        [
            dc * g * _dsigmoid(i),
            dc * c_prev * _dsigmoid(f),
            dc * i * (1 - g * g),
            do * _dsigmoid(o),
        ],
        axis=1,
    )


class ProjectedLSTMCell(Cell):
    """torch's LSTM with projections: ``h_t = (o * tanh(c_t)) @ weight_hr.T``."""

    kind = "lstm_proj"
    gates = 4
    state_names = ("h", "c")

    def __init__(self, proj_size: int) -> None:
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 1:
            raise ValueError(f"proj_size: expected a positive integer, got {proj_size!r}")
        self.proj_size = proj_size

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.proj_size == self.proj_size

    def __hash__(self) -> int:
        return hash((type(self), self.proj_size))

    def __repr__(self) -> str:
        return f"ProjectedLSTMCell(proj_size={self.proj_size})"

    def state_sizes(self, hidden_size: int) -> tuple[int, ...]:
        return (self.proj_size, hidden_size)

    def parameters(self, input_size: int, hidden_size: int) -> dict[str, Param]:
        P = self.proj_size
        return {
            **_lstm_params(input_size, hidden_size, P),
            "weight_hr": Param((P, hidden_size)),
        }

    def step(self, xp, ax, state, params):
        h, c = state
        H = c.shape[1]
        ai, af, g, ao = _gates(xp, _recurrent(xp, h, ax, params), H)
        i, f, o = sigmoid(xp, ai), sigmoid(xp, af), sigmoid(xp, ao)
        c_next = f * c + i * g
        tc = xp.tanh(c_next)
        m = o * tc
        return (xp.matmul(m, params["weight_hr"].T), c_next), (i, f, g, o, tc, c, h, m)

    def step_backward(self, xp, dstate, saved, params):
        dh, dc = dstate
        i, f, g, o, tc, c, h, m = saved
        dm = xp.matmul(dh, params["weight_hr"])
        dc = dc + dm * o * (1 - tc * tc)
        dA = _gates_backward(xp, dc, dm * tc, i, f, g, o, c)
        grads = {"weight_hh": Outer(dA, h), "weight_hr": Outer(dh, m)}
        if "bias_hh" in params:
            grads["bias_hh"] = xp.sum(dA, axis=0)
        return (xp.matmul(dA, params["weight_hh"]), dc * f), dA, grads


class PeepholeLSTMCell(Cell):
    """The LSTM with diagonal peepholes ``weight_ci``, ``weight_cf`` and ``weight_co``."""

    kind = "lstm_peephole"
    gates = 4
    state_names = ("h", "c")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def parameters(self, input_size: int, hidden_size: int) -> dict[str, Param]:
        H = hidden_size
        return {
            **_lstm_params(input_size, H, H),
            "weight_ci": Param((H,)),
            "weight_cf": Param((H,)),
            "weight_co": Param((H,)),
        }

    def step(self, xp, ax, state, params):
        h, c = state
        H = c.shape[1]
        ai, af, g, ao = _gates(xp, _recurrent(xp, h, ax, params), H)
        i = sigmoid(xp, ai + params["weight_ci"] * c)
        f = sigmoid(xp, af + params["weight_cf"] * c)
        c_next = f * c + i * g
        o = sigmoid(xp, ao + params["weight_co"] * c_next)
        tc = xp.tanh(c_next)
        return (o * tc, c_next), (i, f, g, o, tc, c, c_next, h)

    def step_backward(self, xp, dstate, saved, params):
        dh, dc = dstate
        i, f, g, o, tc, c, c_next, h = saved
        dao = dh * tc * _dsigmoid(o)
        dc = dc + dh * o * (1 - tc * tc) + dao * params["weight_co"]
        dai = dc * g * _dsigmoid(i)
        daf = dc * c * _dsigmoid(f)
        dA = xp.concat([dai, daf, dc * i * (1 - g * g), dao], axis=1)
        dc_prev = dc * f + dai * params["weight_ci"] + daf * params["weight_cf"]
        grads = {
            "weight_hh": Outer(dA, h),
            "weight_ci": xp.sum(dai * c, axis=0),
            "weight_cf": xp.sum(daf * c, axis=0),
            "weight_co": xp.sum(dao * c_next, axis=0),
        }
        if "bias_hh" in params:
            grads["bias_hh"] = xp.sum(dA, axis=0)
        return (xp.matmul(dA, params["weight_hh"]), dc_prev), dA, grads


def _norm(xp: ModuleType, a: Array) -> tuple[Array, Array]:
    """``(a_hat, rstd)``: ``a`` normalised over its last axis, and 1/sqrt(var + eps)."""
    d = a - xp.mean(a, axis=-1, keepdims=True)
    rstd = 1 / xp.sqrt(xp.mean(d * d, axis=-1, keepdims=True) + EPS)
    return d * rstd, rstd


def _norm_backward(xp: ModuleType, da_hat: Array, a_hat: Array, rstd: Array) -> Array:
    """The gradient of `_norm`'s input from that of its output."""
    mean = xp.mean(da_hat, axis=-1, keepdims=True)
    cov = xp.mean(da_hat * a_hat, axis=-1, keepdims=True)
    return rstd * (da_hat - mean - a_hat * cov)


def _affine(a_hat: Array, params: dict, gain: str, shift: str) -> Array:
    out = a_hat * params[gain]
    b = params.get(shift)
    return out if b is None else out + b


class LayerNormLSTMCell(Cell):
    """The layer-normalised LSTM of Ba, Kiros and Hinton (2016)."""

    kind = "lstm_layernorm"
    gates = 4
    state_names = ("h", "c")
    projection = ("weight_ih", None)  # the bias comes after the input's layer norm

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def parameters(self, input_size: int, hidden_size: int) -> dict[str, Param]:
        G = 4 * hidden_size
        return {
            "weight_ih": Param((G, input_size)),
            "weight_hh": Param((G, hidden_size)),
            "bias": Param((G,), bias=True),
            "ln_ih_weight": Param((G,), "ones"),
            "ln_ih_bias": Param((G,), "zeros", bias=True),
            "ln_hh_weight": Param((G,), "ones"),
            "ln_hh_bias": Param((G,), "zeros", bias=True),
            "ln_c_weight": Param((hidden_size,), "ones"),
            "ln_c_bias": Param((hidden_size,), "zeros", bias=True),
        }

    def prepare(self, xp, ax, params):
        a_hat, rstd = _norm(xp, ax)
        out = _affine(a_hat, params, "ln_ih_weight", "ln_ih_bias")
        b = params.get("bias")
        return (out if b is None else out + b), (a_hat, rstd)

    def prepare_backward(self, xp, dax, saved, params):
        a_hat, rstd = saved
        axes = tuple(range(dax.ndim - 1))
        dsum = xp.sum(dax, axis=axes)
        grads = {"ln_ih_weight": xp.sum(dax * a_hat, axis=axes)}
        for name in ("ln_ih_bias", "bias"):
            if name in params:
                grads[name] = dsum
        return _norm_backward(xp, dax * params["ln_ih_weight"], a_hat, rstd), grads

    def step(self, xp, ax, state, params):
        h, c = state
        H = c.shape[1]
        r_hat, r_rstd = _norm(xp, xp.matmul(h, params["weight_hh"].T))
        A = ax + _affine(r_hat, params, "ln_hh_weight", "ln_hh_bias")
        ai, af, g, ao = _gates(xp, A, H)
        i, f, o = sigmoid(xp, ai), sigmoid(xp, af), sigmoid(xp, ao)
        c_next = f * c + i * g
        c_hat, c_rstd = _norm(xp, c_next)
        tc = xp.tanh(_affine(c_hat, params, "ln_c_weight", "ln_c_bias"))
        return (o * tc, c_next), (i, f, g, o, tc, c, h, r_hat, r_rstd, c_hat, c_rstd)

    def step_backward(self, xp, dstate, saved, params):
        dh, dc = dstate
        i, f, g, o, tc, c, h, r_hat, r_rstd, c_hat, c_rstd = saved
        dcn = dh * o * (1 - tc * tc)  # gradient of LN(c_t)'s output
        dc = dc + _norm_backward(xp, dcn * params["ln_c_weight"], c_hat, c_rstd)
        dA = _gates_backward(xp, dc, dh * tc, i, f, g, o, c)
        dr = _norm_backward(xp, dA * params["ln_hh_weight"], r_hat, r_rstd)
        grads = {
            "weight_hh": Outer(dr, h),
            "ln_hh_weight": xp.sum(dA * r_hat, axis=0),
            "ln_c_weight": xp.sum(dcn * c_hat, axis=0),
        }
        if "ln_hh_bias" in params:
            grads["ln_hh_bias"] = xp.sum(dA, axis=0)
        if "ln_c_bias" in params:
            grads["ln_c_bias"] = xp.sum(dcn, axis=0)
        return (xp.matmul(dr, params["weight_hh"]), dc * f), dA, grads
