"""Where the Elman forward's time goes on NumPy, next to its GEMM limit.

    python benchmarks/elman_floor.py [N T D H] [--rounds R]

Times, interleaved in one process (`rnn_xp.bench.best_of`), float32:

* ``limit``, rnn_xp's NumPy forward and the notebook's loop, as in the suite;
* the parts of the limit: the input projection into a preallocated buffer and
  into a fresh one, and the T recurrent products;
* what NumPy cannot avoid on top of the GEMMs: filling a fresh (N, T, H)
  array (the output: its pages are mapped and zeroed by the kernel on first
  touch) against refilling one already touched, and each step's elementwise
  update (add the projection, add the bias, tanh) on contiguous arrays that
  are already in cache, and the tanh alone.

``floor`` is the limit plus the fresh-output cost plus the cache-hot
elementwise update: a lower bound for any loop of NumPy calls that returns a
new array, since it leaves out the memory traffic of reading the projection.
"""

from __future__ import annotations

import argparse

import numpy as np

import rnn_xp
from rnn_xp import bench


def parts(N: int, T: int, D: int, H: int) -> dict:
    a = bench.problem("rnn_tanh", N, T, D, H, "float32")
    xs, Wx, Wh, b = a["xs"], a["Wx"], a["Wh"], a["b"]
    x2 = xs.reshape(N * T, D)
    ax = np.empty((N * T, H), np.float32)
    h, step, out = (np.ones((N, H), np.float32) for _ in range(3))

    def projection_fresh():
        np.matmul(x2, Wx)

    def recurrent():
        for _ in range(T):
            np.matmul(h, Wh, out=step)

    def fill_fresh():
        np.empty((N, T, H), np.float32).fill(0)

    def elementwise():
        for _ in range(T):
            np.add(step, out, out=step)
            np.add(step, b, out=step)
            np.tanh(step, out=out)

    def tanh():
        for _ in range(T):
            np.tanh(step, out=out)

    return {
        "limit": bench.limit("rnn_tanh", a)[("limit", False)],
        "rnn_xp numpy": lambda: rnn_xp.rnn_forward(xs, Wx, Wh, b),
        "notebook": next(iter(bench.notebook("rnn_tanh", a).values())),
        "projection, preallocated": lambda: np.matmul(x2, Wx, out=ax),
        "projection, fresh": projection_fresh,
        "T recurrent products": recurrent,
        "fill (N, T, H), fresh": fill_fresh,
        "fill (N, T, H), reused": lambda: ax.fill(0),
        "T x (add, add bias, tanh)": elementwise,
        "T x tanh": tanh,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="*", type=int, default=[256, 64, 512, 512])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    N, T, D, H = args.size
    best = bench.best_of(parts(N, T, D, H), rounds=args.rounds, budget_s=120)
    lim = best["limit"]
    print(f"Elman forward, NumPy {np.__version__}, float32, (N, T, D, H) = {(N, T, D, H)}")
    for label, seconds in best.items():
        print(f"{label:>28} {seconds * 1e3:9.2f} ms {seconds / lim:7.3f} x limit")
    page_cost = best["fill (N, T, H), fresh"] - best["fill (N, T, H), reused"]
    floor = lim + page_cost + best["T x (add, add bias, tanh)"]
    print(f"{'floor':>28} {floor * 1e3:9.2f} ms {floor / lim:7.3f} x limit")


if __name__ == "__main__":
    main()
