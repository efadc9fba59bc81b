"""``rnn-xp check`` (and plain ``python -m rnn_xp``): the notebook-sized example on
every installed backend.

For each backend and dtype it runs `RNNLayer` forward and backward on the same
inputs and prints the backend, device, dtype, the best-of-R forward time, and
the largest deviation of ``hs`` and of every gradient from rnn_xp on NumPy
float64 (whose own agreement with an independent NumPy reference is what the
test suite checks). Backends that cannot run here are listed with the reason,
unless named with ``--backend``: then the command fails (exit status 2) before
running anything, so that a CI job asking for a backend cannot pass without it.
The exit status is 1 if any backend deviates beyond its dtype's tolerance.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from . import RNNLayer, _argtypes
from ._backends import BACKENDS, TOLERANCE, BackendUnavailable, Loaded
from .batch import human_bytes, physical_memory

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


DESCRIPTION = (
    "Run the notebook-sized example (RNNLayer forward and backward) on every installed "
    "backend, in float32 and float64, and print each one's device, best forward time and "
    "largest deviation from NumPy float64. Backends that cannot run here are listed as "
    "skipped, with the reason; a backend named with --backend that cannot run is an error "
    "instead. Exit status: 0 if every backend agrees within its dtype's tolerance, 1 if one "
    "deviates, 2 for a bad argument or a named backend that cannot run."
)


def check(argv: Sequence[str]) -> int:
    """The cross-backend agreement table; exit status 1 on a deviation.

    A backend named with ``--backend`` that cannot run here is an error (one
    line on stderr, exit status 2) before anything runs; without
    ``--backend``, such backends are listed as skipped.
    """
    parser = _argtypes.Parser(prog="rnn-xp check", description=DESCRIPTION)
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(BACKENDS),
        metavar="NAME",
        help=f"Run only this backend (repeatable); one of {', '.join(BACKENDS)}. "
        "Default: every backend, skipping those that cannot run here.",
    )
    parser.add_argument(
        "--size",
        nargs=4,
        type=_argtypes.positive,
        default=[32, 16, 100, 100],
        metavar=("N", "T", "D", "H"),
        help="Batch, time steps, input and hidden features. Default: the notebook's "
        "32 16 100 100.",
    )
    parser.add_argument(
        "--repeat",
        type=_argtypes.positive,
        default=5,
        help="Timed forward runs per backend and dtype; the best is shown. Default: 5.",
    )
    parser.add_argument(
        "--seed",
        type=_argtypes.seed,
        default=0,
        help="Seed of the random problem, a non-negative integer. Default: 0.",
    )
    args = parser.parse_args(argv)
    N, T, D, H = args.size
    # The problem in float64 and its float32 copy, the reference's and one
    # backend's outputs and caches: an upper estimate.
    needed = 8 * 12 * (N * T * (D + 2 * H) + H * (D + H + N))
    memory = physical_memory()
    if memory is not None and needed > memory:
        parser.error(
            f"argument --size: N={N} T={T} D={D} H={H} needs about {human_bytes(needed)} of "
            f"memory, more than this machine's {human_bytes(memory)}"
        )

    names = list(dict.fromkeys(args.backend or BACKENDS))
    loaded_by_name: dict[str, Loaded | BackendUnavailable] = {}
    for name in names:
        try:
            loaded_by_name[name] = BACKENDS[name].load()
        except BackendUnavailable as exc:
            if args.backend:
                reason = " ".join(str(exc).split())
                print(
                    f"rnn-xp: error: --backend {name}: cannot run here: {reason}",
                    file=sys.stderr,
                )
                return 2
            loaded_by_name[name] = exc

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
    for name in names:
        loaded = loaded_by_name[name]
        if isinstance(loaded, BackendUnavailable):
            print(f"{name:<26}skipped: {loaded}")
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
