"""``rnn-xp check`` (and plain ``python -m rnn_xp``): the notebook-sized example on
every installed backend.

For each backend and dtype it runs `RNNLayer` forward and backward on the same
inputs and prints the backend, device, dtype, the best-of-R forward time, and
the largest deviation of ``hs`` and of every gradient from rnn_xp on NumPy
float64 (whose own agreement with an independent NumPy reference is what the
test suite checks). Backends that cannot run here are listed with the reason.
The exit status is 1 if any backend deviates beyond its dtype's tolerance.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from . import RNNLayer
from ._backends import BACKENDS, TOLERANCE, BackendUnavailable, Loaded

DTYPES = ("float32", "float64")


def _problem(N: int, T: int, D: int, H: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "xs": rng.standard_normal((N, T, D)),
        "Wx": rng.standard_normal((D, H)) / np.sqrt(D),
        "Wh": rng.standard_normal((H, H)) / np.sqrt(H),
        "b": rng.standard_normal((N, H)),  # the notebook's (N, H) bias
        "dhs": rng.standard_normal((N, T, H)),
    }


def _run(loaded: Loaded, arrays: dict[str, np.ndarray]) -> tuple[RNNLayer, list]:
    a = {k: loaded.asarray(v) for k, v in arrays.items()}
    layer = RNNLayer(a["Wx"], a["Wh"], a["b"])
    hs = loaded.block(layer.forward(a["xs"]))
    dxs = layer.backward(a["dhs"])
    return layer, [hs, dxs, layer.dh, *layer.grads]


def _best_forward_seconds(loaded: Loaded, arrays: dict[str, np.ndarray], repeat: int) -> float:
    a = {k: loaded.asarray(v) for k, v in arrays.items()}
    layer = RNNLayer(a["Wx"], a["Wh"], a["b"])
    loaded.block(layer.forward(a["xs"]))  # warm-up: imports, compilation, allocation
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        loaded.block(layer.forward(a["xs"]))
        best = min(best, time.perf_counter() - start)
    return best


def _deviation(outputs: list, reference: list[np.ndarray], loaded: Loaded) -> float:
    """Largest |ours - reference| over all outputs, relative to max(1, max |reference|)."""
    return max(
        float(np.max(np.abs(loaded.to_numpy(o).astype(np.float64) - r)))
        / max(1.0, float(np.max(np.abs(r))))
        for o, r in zip(outputs, reference)
    )


def check(argv: Sequence[str]) -> int:
    """The cross-backend agreement table; exit status 1 on a deviation."""
    parser = argparse.ArgumentParser(
        prog="python -m rnn_xp check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(BACKENDS),
        metavar="NAME",
        help=f"run only this backend (repeatable); one of {', '.join(BACKENDS)}",
    )
    parser.add_argument(
        "--size",
        nargs=4,
        type=int,
        default=[32, 16, 100, 100],
        metavar=("N", "T", "D", "H"),
        help="default: the notebook's 32 16 100 100",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best is shown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    N, T, D, H = args.size
    if min(args.size) < 1 or args.repeat < 1:
        parser.error("--size and --repeat take positive integers")

    base = _problem(N, T, D, H, args.seed)
    numpy = BACKENDS["numpy"].load()
    print(
        f"rnn_xp RNNLayer, N={N} T={T} D={D} H={H}; time: best of {args.repeat} forward runs; "
        f"deviation: max over hs and all gradients, relative, vs NumPy float64"
    )
    header = (
        f"{'backend':<26}{'device':<40}{'dtype':<9}{'time (ms)':>10}  {'deviation':>10}  status"
    )
    print(header)
    print("-" * len(header))

    failed = False
    for name in args.backend or list(BACKENDS):
        try:
            loaded = BACKENDS[name].load()
        except BackendUnavailable as exc:
            print(f"{name:<26}skipped: {exc}")
            continue
        for dtype in DTYPES:
            # Round the inputs to dtype first, so that the deviation measures
            # the computation, not the rounding of the inputs.
            arrays = {k: v.astype(dtype) for k, v in base.items()}
            _, reference = _run(numpy, {k: v.astype(np.float64) for k, v in arrays.items()})
            _, outputs = _run(loaded, arrays)
            dev = _deviation(outputs, reference, loaded)
            ms = 1e3 * _best_forward_seconds(loaded, arrays, args.repeat)
            ok = dev <= TOLERANCE[dtype]
            failed |= not ok
            status = "ok" if ok else f"FAIL (> {TOLERANCE[dtype]:g})"
            where = str(loaded.device)[:39]
            print(f"{name:<26}{where:<40}{dtype:<9}{ms:>10.3f}  {dev:>10.2e}  {status}")
    return 1 if failed else 0
