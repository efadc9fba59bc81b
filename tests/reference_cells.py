"""NumPy float64 references for the cells built on `rnn_xp.cells`, from their papers.

Written independently of rnn_xp: one sequence at a time, one step at a time, no
hoisting, no masks (a sequence of length L is its first L steps; the reverse
direction runs them backwards), each cell from its published equations:

* IndRNN (Li et al. 2018): ``h_t = relu(W x_t + b + u * h_{t-1})``.
* Peephole LSTM (Gers, Schraudolph and Schmidhuber 2002), diagonal peepholes
  from ``c_{t-1}`` into the input and forget gates and from ``c_t`` into the
  output gate.
* LayerNorm LSTM (Ba, Kiros and Hinton 2016, eq. 20-22): layer norm with gain
  and bias on ``W_h h`` and ``W_x x`` separately, and on ``c_t`` before the tanh.
* torch's LSTM with projections: ``h_t = W_hr (o * tanh(c_t))``.

Gates are in torch's order i, f, g, o; parameters by the names rnn_xp gives them.
"""

from __future__ import annotations

import re

import numpy as np


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _layer_norm(a, gain, shift, eps=1e-5):
    mu = a.mean(axis=-1, keepdims=True)
    sigma = np.sqrt(((a - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    return gain * (a - mu) / sigma + (0 if shift is None else shift)


def _split4(a):
    return np.split(a, 4, axis=-1)


def indrnn_step(x, state, p):
    (h,) = state
    a = p["weight_ih"] @ x + p.get("bias_ih", 0) + p["weight_hh"] * h
    return (np.maximum(a, 0),)


def peephole_step(x, state, p):
    h, c = state
    z = p["weight_ih"] @ x + p["weight_hh"] @ h + p.get("bias_ih", 0) + p.get("bias_hh", 0)
    zi, zf, zg, zo = _split4(z)
    i = _sigmoid(zi + p["weight_ci"] * c)
    f = _sigmoid(zf + p["weight_cf"] * c)
    c = f * c + i * np.tanh(zg)
    o = _sigmoid(zo + p["weight_co"] * c)
    return o * np.tanh(c), c


def layernorm_step(x, state, p):
    h, c = state
    z = (
        _layer_norm(p["weight_hh"] @ h, p["ln_hh_weight"], p.get("ln_hh_bias"))
        + _layer_norm(p["weight_ih"] @ x, p["ln_ih_weight"], p.get("ln_ih_bias"))
        + p.get("bias", 0)
    )
    zi, zf, zg, zo = _split4(z)
    c = _sigmoid(zf) * c + _sigmoid(zi) * np.tanh(zg)
    h = _sigmoid(zo) * np.tanh(_layer_norm(c, p["ln_c_weight"], p.get("ln_c_bias")))
    return h, c


def projected_step(x, state, p):
    h, c = state
    z = p["weight_ih"] @ x + p["weight_hh"] @ h + p.get("bias_ih", 0) + p.get("bias_hh", 0)
    zi, zf, zg, zo = _split4(z)
    c = _sigmoid(zf) * c + _sigmoid(zi) * np.tanh(zg)
    return p["weight_hr"] @ (_sigmoid(zo) * np.tanh(c)), c


def _layer_params(state_dict, layer, direction):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    pattern = re.compile(rf"(.*){re.escape(suffix)}")
    return {
        m.group(1): np.asarray(v, np.float64)
        for k, v in state_dict.items()
        if (m := pattern.fullmatch(k)) is not None
    }


def run_model(step, state_dict, xs, lengths, states0, num_layers, bidirectional):
    """The reference of `Recurrent.forward` (batch-first): ``(out, finals)``.

    ``states0`` is a tuple of arrays (num_layers*num_directions, N, width);
    ``finals`` the same layout after each sequence's last step. Outputs past a
    sequence's length are zero.
    """
    N, T, _ = xs.shape
    dirs = 2 if bidirectional else 1
    width = states0[0].shape[-1]
    out = np.zeros((N, T, dirs * width))
    finals = tuple(np.zeros_like(s, dtype=np.float64) for s in states0)
    for n in range(N):
        L = int(lengths[n])
        seq = [np.asarray(xs[n, t], np.float64) for t in range(L)]
        for layer in range(num_layers):
            outs = []
            for d in range(dirs):
                p = _layer_params(state_dict, layer, d)
                k = layer * dirs + d
                state = tuple(np.asarray(s[k, n], np.float64) for s in states0)
                ys = [None] * L
                for t in reversed(range(L)) if d else range(L):
                    state = step(seq[t], state, p)
                    ys[t] = state[0]
                for f, s in zip(finals, state):
                    f[k, n] = s
                outs.append(ys)
            seq = [np.concatenate([o[t] for o in outs]) for t in range(L)]
        out[n, :L] = np.stack(seq)
    return out, finals


# -- what the tests share -----------------------------------------------------------


def readme_cell(name: str) -> type:
    """The class ``name`` as the README defines it, from the README's own example."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for code in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL):
        if f"class {name}(" in code:
            namespace: dict = {}
            exec(compile(code, "README.md", "exec"), namespace)
            return namespace[name]
    raise LookupError(f"README.md defines no class {name}")


def perturbed(model, seed=0, scale=0.3):
    """``model``'s state_dict (NumPy float64) with every parameter moved at random.

    Gains that start at one and shifts at zero would hide a transposed gain or
    a missing shift; random values show them.
    """
    rng = np.random.default_rng(seed)
    return {
        k: np.asarray(v, np.float64) + scale * rng.standard_normal(v.shape)
        for k, v in model.state_dict().items()
    }


def problem(model, N=3, T=5, seed=1):
    """Batch-first ``xs``, ``lengths`` (one of them T), initial states and their gradients."""
    rng = np.random.default_rng(seed)
    S = model.num_layers * model.num_directions
    xs = rng.standard_normal((N, T, model.input_size))
    lengths = np.array([T] + [int(v) for v in rng.integers(1, T + 1, N - 1)])
    states0 = tuple(rng.standard_normal((S, N, w)) for w in model._widths)
    F = model.num_directions * model._widths[0]
    dout = rng.standard_normal((N, T, F))
    dstates = tuple(rng.standard_normal(s.shape) for s in states0)
    return xs, lengths, states0, dout, dstates


def state_arg(states):
    return states if len(states) == 2 else states[0]


def finals_of(h_n):
    return h_n if isinstance(h_n, tuple) else (h_n,)
