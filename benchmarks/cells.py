"""What the generic loop costs the cells built on `rnn_xp.cells`, and what a fused one would gain.

    python benchmarks/cells.py [--rounds R] [--sizes N,T,D,H ...]

On NumPy float32, interleaved in one process (`rnn_xp.bench.best_of`: round
robin, every other round reversed, best of R), forward (``inference=True``)
and forward+backward of a one-layer ``Recurrent`` for:

* ``lstm, fused``: the LSTM on its fused in-place loops (`rnn_xp._fused_numpy`);
* ``lstm, generic``: the same model with the fused loops off
  (``_fastpath.DISABLED``): the loop every `rnn_xp.cells.Cell` runs;
* ``lstm_peephole``, ``lstm_layernorm``, ``lstm proj_size=H/2``: the cells of
  `rnn_xp.lstm_variants`, on that generic loop;
* ``torch.nn.LSTM`` on CPU tensors, if torch is installed, for scale.

The ratio ``lstm, generic`` / ``lstm, fused`` is what a fused loop would save
a cell of the same shape: the LSTM variants add elementwise work to the same
step, so a fused loop of theirs could gain at most about as much.
"""

from __future__ import annotations

import argparse

import numpy as np

import rnn_xp
from rnn_xp import _fastpath, bench

SIZES = ((32, 16, 100, 100), (64, 64, 256, 256), (128, 64, 512, 512))


def _contenders(N: int, T: int, D: int, H: int) -> dict:
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((T, N, D)).astype(np.float32)
    models = {
        "lstm, fused": rnn_xp.Recurrent("lstm", D, H, seed=0),
        "lstm, generic": rnn_xp.Recurrent("lstm", D, H, seed=0),
        "lstm_peephole": rnn_xp.Recurrent("lstm_peephole", D, H, seed=0),
        "lstm_layernorm": rnn_xp.Recurrent("lstm_layernorm", D, H, seed=0),
        "lstm proj_size=H/2": rnn_xp.Recurrent("lstm", D, H, seed=0, proj_size=H // 2),
    }
    forward, train = {}, {}
    for label, model in models.items():
        generic = label == "lstm, generic"

        def fwd(model=model, generic=generic):
            before = _fastpath.DISABLED
            _fastpath.DISABLED = generic
            try:
                return model.forward(xs, inference=True)[0]
            finally:
                _fastpath.DISABLED = before

        def both(model=model, generic=generic):
            before = _fastpath.DISABLED
            _fastpath.DISABLED = generic
            try:
                out, _ = model.forward(xs)
                return model.backward(np.ones_like(out))
            finally:
                _fastpath.DISABLED = before

        forward[label], train[label] = fwd, both
    np.testing.assert_allclose(
        forward["lstm, fused"](), forward["lstm, generic"](), rtol=1e-4, atol=1e-5
    )
    try:
        import torch
    except ImportError:
        return {"forward": forward, "forward+backward": train}
    module = torch.nn.LSTM(D, H)
    x = torch.from_numpy(xs)

    def torch_forward():
        with torch.inference_mode():
            return module(x)[0]

    def torch_train():
        xg = x.clone().requires_grad_(True)
        out, _ = module(xg)
        out.sum().backward()
        return xg.grad

    forward["torch.nn.LSTM"], train["torch.nn.LSTM"] = torch_forward, torch_train
    return {"forward": forward, "forward+backward": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", nargs="*", default=None, metavar="N,T,D,H")
    args = parser.parse_args()
    sizes = [tuple(map(int, s.split(","))) for s in args.sizes] if args.sizes else SIZES
    for size in sizes:
        for what, fns in _contenders(*size).items():
            times = bench.best_of(fns, args.rounds, budget_s=60.0)
            fused = times["lstm, fused"]
            print(f"\n(N, T, D, H) = {size}, {what}, best of {args.rounds}:")
            for label, t in times.items():
                print(f"  {label:<22} {t * 1e3:9.2f} ms  {t / fused:5.2f}x the fused LSTM")


if __name__ == "__main__":
    main()
