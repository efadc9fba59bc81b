"""Long sequences in low precision: a bfloat16 state drifts, the mixed policy does not.

    python benchmarks/precision_drift.py [--out benchmarks/precision-drift.png]

An LSTM that integrates its input over hundreds of steps, as language and
signal models must: forget gates near one (their bias raised by 6, so f is
about 0.9975 and c remembers ~400 steps) and a weak recurrent product (W_hh
scaled by 0.2, so the trajectory is stable, not chaotic: float32 stays within
1e-4 of float64 all the way). D=8, H=64, N=8, T=2000, inputs N(0, 1), on torch
CPU tensors; the cell state c is recorded at every step (`Recurrent.step`).

Against the float64 run, at every step, the largest error of c over the batch
and the units, relative to the largest |c| of the float64 run, for:

* ``float32``: the model and its inputs in float32;
* ``bf16-mixed``, ``16-mixed``: the float32 model under the policy (products of
  bfloat16 or float16 operands; the state, and everything else, float32);
* ``bfloat16``, ``float16``: the model, its inputs and so its state in the
  half format throughout (``model.astype("bfloat16")``): rnn_xp's behaviour
  with half-precision inputs and no policy.

Prints the errors at a few steps and draws them (log scale) into ``--out``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import rnn_xp

D, H, N, T = 8, 64, 8, 2000
FORGET_BIAS, RECURRENT_SCALE = 6.0, 0.2
RUNS = ("float32", "16-mixed", "bf16-mixed", "float16", "bfloat16")


def integrating_lstm(torch):
    """The float64 model: forget gates near one, a weak recurrent product."""
    model = rnn_xp.Recurrent("lstm", D, H, seed=0, like=torch.zeros(1), dtype="float64")
    params = model.state_dict()
    bias = params["bias_hh_l0"].clone()
    bias[H : 2 * H] += FORGET_BIAS  # gates i, f, g, o: f's block
    params["bias_hh_l0"] = bias
    params["weight_hh_l0"] = params["weight_hh_l0"] * RECURRENT_SCALE
    model.load_state_dict(params)
    return model.eval()


def cell_states(model, xs, precision=None):
    """c after every step, (T, N, H) in float64, stepping under ``precision``."""
    model.precision = rnn_xp.precision.policy(precision)
    state, cs = None, []
    for t in range(xs.shape[0]):
        _, state = model.step(xs[t], state)
        cs.append(state[1][0].double())
    return np.stack([c.numpy() for c in cs])


def drift(seed: int = 0) -> dict[str, np.ndarray]:
    """Each run's relative error of c against float64, per step: {run: (T,)}."""
    import torch

    x = np.random.default_rng(seed).standard_normal((T, N, D))
    model = integrating_lstm(torch)
    ref = cell_states(model, torch.tensor(x))
    scale = np.max(np.abs(ref))
    errors = {}
    for run in RUNS:
        if run.endswith("-mixed"):
            m, xs, policy = model.astype("float32"), torch.tensor(x, dtype=torch.float32), run
        else:
            dtype = getattr(torch, run)
            m, xs, policy = model.astype(run), torch.tensor(x, dtype=dtype), None
        c = cell_states(m, xs, policy)
        errors[run] = np.max(np.abs(c - ref), axis=(1, 2)) / scale
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/precision-drift.png")
    args = parser.parse_args()
    import torch

    start = time.perf_counter()
    errors = drift()
    steps = (10, 100, 500, 1000, 2000)
    print(f"torch {torch.__version__}, numpy {np.__version__}, rnn_xp {rnn_xp.__version__}")
    print(f"max |c - c_float64| / max |c_float64| at step ({time.perf_counter() - start:.0f} s)")
    print(f"{'run':12s}" + "".join(f"{t:>10d}" for t in steps) + f"{'max':>10s}")
    for run, e in errors.items():
        print(f"{run:12s}" + "".join(f"{e[t - 1]:10.1e}" for t in steps) + f"{e.max():10.1e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    styles = {
        "float32": ("black", "-"),
        "16-mixed": ("tab:blue", "-"),
        "bf16-mixed": ("tab:green", "-"),
        "float16": ("tab:blue", ":"),
        "bfloat16": ("tab:red", ":"),
    }
    t = np.arange(1, T + 1)
    for run, e in errors.items():
        color, style = styles[run]
        label = run + (" (state float32)" if run.endswith("-mixed") else "")
        label += " (state in the format)" if run in ("float16", "bfloat16") else ""
        ax.semilogy(t, np.maximum(e, 1e-9), color=color, linestyle=style, label=label)
    ax.set(
        xlabel="time step",
        ylabel="error of c, relative to max |c|",
        title=f"LSTM cell state over T={T} steps against float64 (torch CPU)",
        ylim=(1e-8, 3),
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
