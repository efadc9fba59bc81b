"""Streaming one step at a time: rnn_xp's ``step`` against what a user would write.

    python benchmarks/streaming.py [N D H L] [--mode lstm] [--rounds R]

Times one call that takes a step's input (N, D) and the state of L stacked
layers to the step's output and the new state, on the CPU, float32,
interleaved in one process (`rnn_xp.bench.best_of`: round robin, every other
round reversed, best of R, each call repeated to fill 20 ms):

* ``hand-written numpy``: the loop a NumPy user writes for the mode, with the
  weights already transposed and the biases summed
  (``a = x @ Wx + h @ Wh + b``, ``sigmoid = 1 / (1 + exp(-a))``, ...);
* ``rnn_xp step``: `rnn_xp._streaming.step` (``Recurrent.step``);
* ``rnn_xp step, zero state``: the first step of a stream (state None);
* ``rnn_xp cell functions``: ``lstm_cell_forward`` (``gru_cell_forward``,
  ``rnn_cell_forward``) once per layer, as a user of the cell API would;
* ``rnn_xp forward, T=1``: ``Recurrent.forward`` over a one-step sequence;
* ``torch.nn, one step``: ``torch.nn.LSTM`` (``GRU``, ``RNN``) over a one-step
  sequence under ``torch.inference_mode``, and ``rnn_xp step, torch``, the same
  weights as torch CPU tensors, if torch is installed;
* ``rnn_xp step, jax.jit``: ``step`` on JAX arrays, compiled once by
  ``jax.jit``, if JAX is installed.

Every contender starts from the same weights and state; their outputs are
checked against each other before timing.

A stream of N=1 steps gains nothing from a second thread, and on a loaded
2-core machine torch's and OpenBLAS's thread pools can cost milliseconds a
call (torch.nn took 40-80 ms a step there): run with ``OMP_NUM_THREADS=1``
for figures that measure the step rather than the scheduler.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import rnn_xp
from rnn_xp import bench
from rnn_xp._streaming import step


def hand_written(mode: str, model: rnn_xp.Recurrent):
    """The step a NumPy user writes, weights prepared once (transposed, biases summed)."""
    H, L = model.hidden_size, model.num_layers
    sd = model.state_dict()
    w = []
    for layer in range(L):
        Wx, Wh = sd[f"weight_ih_l{layer}"].T.copy(), sd[f"weight_hh_l{layer}"].T.copy()
        bx, bh = sd[f"bias_ih_l{layer}"], sd[f"bias_hh_l{layer}"]
        w.append((Wx, Wh, bx + bh) if mode != "gru" else (Wx, Wh, bx, bh))

    def sigmoid(a):
        return 1 / (1 + np.exp(-a))

    def lstm(x, state):
        hs, cs = state
        new_h, new_c = [], []
        for (Wx, Wh, b), h, c in zip(w, hs, cs):
            a = x @ Wx + h @ Wh + b
            s = sigmoid(a)
            i, f, o = s[:, :H], s[:, H : 2 * H], s[:, 3 * H :]
            g = np.tanh(a[:, 2 * H : 3 * H])
            c = f * c + i * g
            x = o * np.tanh(c)
            new_h.append(x)
            new_c.append(c)
        return x, (np.stack(new_h), np.stack(new_c))

    def gru(x, hs):
        new_h = []
        for (Wx, Wh, bx, bh), h in zip(w, hs):
            ax, ah = x @ Wx + bx, h @ Wh + bh
            rz = sigmoid(ax[:, : 2 * H] + ah[:, : 2 * H])
            r, z = rz[:, :H], rz[:, H:]
            n = np.tanh(ax[:, 2 * H :] + r * ah[:, 2 * H :])
            x = n + z * (h - n)
            new_h.append(x)
        return x, np.stack(new_h)

    def elman(x, hs):
        new_h = []
        for (Wx, Wh, b), h in zip(w, hs):
            a = x @ Wx + h @ Wh + b
            x = np.tanh(a) if mode == "rnn_tanh" else np.maximum(a, 0)
            new_h.append(x)
        return x, np.stack(new_h)

    return {"lstm": lstm, "gru": gru}.get(mode, elman)


def cell_functions(mode: str, model: rnn_xp.Recurrent):
    """One call of rnn_xp's cell function per layer (``lstm_cell_forward`` and kin)."""
    sd = model.state_dict()
    w = []
    for layer in range(model.num_layers):
        Wx, Wh = sd[f"weight_ih_l{layer}"].T, sd[f"weight_hh_l{layer}"].T
        bx, bh = sd[f"bias_ih_l{layer}"], sd[f"bias_hh_l{layer}"]
        w.append((Wx, Wh, bx + bh) if mode != "gru" else (Wx, Wh, bx, bh))

    def lstm(x, state):
        new_h, new_c = [], []
        for weights, h, c in zip(w, *state):
            x, c = rnn_xp.lstm_cell_forward(x, h, c, *weights)
            new_h.append(x)
            new_c.append(c)
        return x, (np.stack(new_h), np.stack(new_c))

    def other(x, hs):
        new_h = []
        for weights, h in zip(w, hs):
            if mode == "gru":
                x = rnn_xp.gru_cell_forward(x, h, *weights)
            else:
                x = rnn_xp.rnn_cell_forward(x, h, *weights, nonlinearity=mode[4:])
            new_h.append(x)
        return x, np.stack(new_h)

    return lstm if mode == "lstm" else other


def contenders(mode: str, N: int, D: int, H: int, L: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    h, c = (rng.standard_normal((L, N, H)).astype(np.float32) for _ in range(2))
    state = (h, c) if mode == "lstm" else h
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        kinds = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
        kind = kinds.get(mode, torch.nn.RNN)
        extra = {} if mode in kinds else {"nonlinearity": mode[4:]}
        module = kind(D, H, L, **extra).eval()
        model = rnn_xp.from_torch(module)
    else:
        model = rnn_xp.Recurrent(mode, D, H, L, seed=0).eval()

    # The prepared weights are made once, outside the timed calls.
    hand, cells = hand_written(mode, model), cell_functions(mode, model)
    fns = {
        "hand-written numpy": lambda: hand(x, state),
        "rnn_xp step": lambda: step(model, x, state),
        "rnn_xp step, zero state": lambda: step(model, x),
        "rnn_xp cell functions": lambda: cells(x, state),
        "rnn_xp forward, T=1": lambda: _first(model.forward(x[None], state, inference=True)),
    }
    if torch is not None:
        tx = torch.from_numpy(x)[None]
        ts = tuple(map(torch.from_numpy, state)) if mode == "lstm" else torch.from_numpy(h)

        def torch_step():
            with torch.inference_mode():
                out, s = module(tx, ts)
            return out[0], s

        fns["torch.nn, one step"] = torch_step
        on_torch = rnn_xp.from_torch(module, like=torch.zeros(1)).eval()
        fns["rnn_xp step, torch"] = lambda: step(on_torch, tx[0], ts)
    try:
        import jax
    except ImportError:
        jax = None
    if jax is not None:
        on_jax = rnn_xp.Recurrent(mode, D, H, L, like=jax.numpy.zeros(1)).eval()
        on_jax.load_state_dict(model.state_dict())
        jitted = jax.jit(lambda x, s: step(on_jax, x, s))
        jx = jax.numpy.asarray(x)
        js = tuple(map(jax.numpy.asarray, state)) if mode == "lstm" else jax.numpy.asarray(h)

        def jax_step():
            y, s = jitted(jx, js)
            return y.block_until_ready(), s

        fns["rnn_xp step, jax.jit"] = jax_step

    expected = hand(x, state)[0]
    deviations = {
        label: float(np.max(np.abs(np.asarray(f()[0]) - expected)))
        for label, f in fns.items()
        if "zero state" not in label
    }
    return fns, deviations


def _first(result):
    """``(out[0], state)`` of a one-step forward: its output as a step returns it."""
    out, state = result
    return out[0], state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="*", type=int, default=[1, 128, 128, 2], help="N D H L")
    parser.add_argument("--mode", default="lstm", choices=list(rnn_xp.MODES))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    N, D, H, L = args.size
    fns, deviations = contenders(args.mode, N, D, H, L)
    best = bench.best_of(fns, rounds=args.rounds, budget_s=120)
    base = best["hand-written numpy"]
    try:
        import torch

        threads = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        threads = ""
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"One step of {args.mode}, {L} layers, (N, D, H) = {(N, D, H)}, float32, "
        f"numpy {np.__version__}{threads}, OMP_NUM_THREADS={omp}; best of {args.rounds}"
    )
    for label, seconds in best.items():
        dev = deviations.get(label)
        note = "" if dev is None else f"  (max |y - hand-written| {dev:.1e})"
        print(f"{label:>26} {seconds * 1e6:9.1f} us {seconds / base:6.2f} x hand-written{note}")


if __name__ == "__main__":
    main()
