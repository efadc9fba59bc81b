"""The ``rnn-xp`` command (also ``python -m rnn_xp``).

Subcommands: ``check`` (the default), ``bench``, ``init``, ``convert``, ``run`` and
``train``. A problem with the input prints one line on stderr, ``rnn-xp: error:
...``, and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._backends import BackendUnavailable, for_run
from .model import MODES, Recurrent

EXTRAS = {"numpy": None, "torch": "torch", "jax": "jax", "cupy": "cuda12"}


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnn-xp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("check", help="cross-backend agreement table (the default)", add_help=False)
    sub.add_parser("bench", help="the benchmark suite (see BENCHMARKS.md)", add_help=False)

    p = sub.add_parser("init", help="write fresh weights")
    p.add_argument("--mode", required=True, choices=list(MODES))
    p.add_argument("--input-size", required=True, type=_positive, metavar="D")
    p.add_argument("--hidden-size", required=True, type=_positive, metavar="H")
    p.add_argument("--num-layers", type=_positive, default=1, metavar="L")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--out", required=True, metavar="W", help=".npz or .safetensors")

    p = sub.add_parser("convert", help="convert a torch state_dict (.pt) to .npz/.safetensors")
    p.add_argument("source", metavar="IN.pt")
    p.add_argument("target", metavar="OUT")
    p.add_argument("--mode", choices=list(MODES), help="needed for a plain RNN (tanh or relu)")
    p.add_argument("--batch-first", action="store_true")

    p = sub.add_parser("run", help="run a model over a .npy of sequences, in chunks")
    p.add_argument("--weights", required=True, metavar="W")
    p.add_argument("--input", required=True, metavar="X.npy", help="shape (N, T, D)")
    p.add_argument("--out", required=True, metavar="Y.npy", help="written as (N, T, F)")
    p.add_argument("--backend", default="numpy", help="numpy, cupy, torch or jax")
    p.add_argument("--device", default=None, help="e.g. cuda:0 (torch), 1 (cupy), gpu (jax)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--batch-size", type=int, default=1024, metavar="B")
    p.add_argument("--lengths", default=None, metavar="L.npy")
    p.add_argument("--state-out", default=None, metavar="S.npy")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train", help="train a character-level LSTM on a bundled text")
    p.add_argument("--steps", type=_positive, default=300)
    p.add_argument("--hidden-size", type=_positive, default=64)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="rnn-xp-charlm.npz", metavar="W")
    p.add_argument("--plot", default=None, metavar="PNG", help="loss curve (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(argv[1:])
    if (
        not argv
        or argv[0] == "check"
        or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))
    ):
        from .check import check

        return check(argv[1:] if argv[:1] == ["check"] else argv)
    args = _parser().parse_args(argv)
    try:
        return {"init": init, "convert": convert, "run": run, "train": train}[args.command](args)
    except (CLIError, BackendUnavailable, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"rnn-xp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnn-xp: interrupted", file=sys.stderr)
        return 130


def _backend(name: str, device: str | None):
    if name not in EXTRAS:
        raise CLIError(f"--backend: expected one of {', '.join(EXTRAS)}, got {name!r}")
    try:
        return for_run(name, device)
    except BackendUnavailable as exc:
        hint = f"; pip install 'rnn-xp[{EXTRAS[name]}]'" if EXTRAS[name] else ""
        if name == "cupy":
            hint += " (or [cuda13] for CUDA 13)"
        raise CLIError(f"--backend {name}: {exc}{hint}") from None


def init(args: argparse.Namespace) -> int:
    model = Recurrent(
        args.mode,
        args.input_size,
        args.hidden_size,
        args.num_layers,
        bias=not args.no_bias,
        batch_first=True,
        bidirectional=args.bidirectional,
        seed=args.seed,
        dtype=args.dtype,
    )
    model.save(args.out)
    print(
        f"wrote {args.out}: {args.mode}, D={args.input_size}, H={args.hidden_size}, "
        f"{args.num_layers} layer(s){', bidirectional' if args.bidirectional else ''}"
    )
    return 0


def convert(args: argparse.Namespace) -> int:
    from .io import load_torch

    try:
        model = load_torch(args.source, mode=args.mode, batch_first=args.batch_first)
    except ImportError:
        raise CLIError(
            "convert needs PyTorch to read a .pt file; pip install 'rnn-xp[torch]'"
        ) from None
    model.save(args.target)
    print(
        f"wrote {args.target}: {model.mode}, D={model.input_size}, H={model.hidden_size}, "
        f"{model.num_layers} layer(s){', bidirectional' if model.bidirectional else ''}"
    )
    return 0


def _load_npy(path: str, what: str) -> np.ndarray:
    if not Path(path).is_file():
        raise CLIError(f"{what}: no such file {path!r}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise CLIError(f"{what}: {path!r} is not a numeric .npy file ({exc})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise CLIError(f"{what}: {path!r} is not a numeric .npy file (dtype {a.dtype})")
    return a


def _write_atomically(path: str, shape: tuple, dtype: np.dtype):
    """A memory-mapped .npy under a temporary name, and the function that completes it."""
    target = Path(path)
    tmp = target.with_name(target.name + ".partial")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)

    def finish() -> None:
        out.flush()
        os.replace(tmp, target)

    return out, finish


def run(args: argparse.Namespace) -> int:
    from .io import _dtype_name, load

    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    backend = _backend(args.backend, args.device)
    xs = _load_npy(args.input, "--input")
    head = load(args.weights)  # NumPy: sizes and dtype, before touching the device
    D = head.input_size
    if xs.ndim != 3 or xs.shape[2] != D:
        raise CLIError(
            f"--input: expected shape (N, T, D={D}) for weights {args.weights!r} "
            f"(input_size {D}), got {xs.shape}"
        )
    N, T = xs.shape[0], xs.shape[1]
    lengths = None
    if args.lengths is not None:
        lengths = _load_npy(args.lengths, "--lengths")
        if lengths.shape != (N,) or lengths.dtype.kind not in "iu":
            raise CLIError(
                f"--lengths: expected integers of shape (N={N},), "
                f"got {lengths.dtype} {lengths.shape}"
            )
    dtype = args.dtype or _dtype_name(head._dtype)
    like = backend.asarray(np.zeros(1, dtype=dtype))
    model = load(args.weights, like=like)
    model.batch_first = True  # the files are batch-major whatever the model was trained with
    F = model.hidden_size * model.num_directions
    S = model.num_layers * model.num_directions
    lstm = model.mode == "lstm"

    ys, finish_ys = _write_atomically(args.out, (N, T, F), np.dtype(dtype))
    if args.state_out:
        state_shape = (2, S, N, model.hidden_size) if lstm else (S, N, model.hidden_size)
        states, finish_states = _write_atomically(args.state_out, state_shape, np.dtype(dtype))

    def fetch(start: int):
        stop = min(start + args.batch_size, N)
        x = backend.asarray(np.asarray(xs[start:stop], dtype=dtype))
        n = None if lengths is None else backend.asarray(np.asarray(lengths[start:stop]))
        return start, stop, x, n

    bar = _progress(N, "sequences", disable=args.no_progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Read (and move to the device) the next chunk while this one computes.
        pending = pool.submit(fetch, 0)
        while pending is not None:
            start, stop, x, n = pending.result()
            pending = pool.submit(fetch, stop) if stop < N else None
            out, h_n = model.forward(x, lengths=n, inference=True)
            ys[start:stop] = backend.to_numpy(out)
            if args.state_out:
                if lstm:
                    states[0, :, start:stop] = backend.to_numpy(h_n[0])
                    states[1, :, start:stop] = backend.to_numpy(h_n[1])
                else:
                    states[:, start:stop] = backend.to_numpy(h_n)
            bar.update(stop - start)
    bar.close()
    finish_ys()
    if args.state_out:
        finish_states()
    return 0


def _progress(total: int | None, unit: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=" " + unit, unit_scale=True, disable=disable, file=sys.stderr)


def train(args: argparse.Namespace) -> int:
    from .train import train_char_lm

    backend = _backend(args.backend, args.device)
    if args.plot is not None:
        try:
            import matplotlib
        except ImportError:
            raise CLIError("--plot needs matplotlib; pip install 'rnn-xp[plot]'") from None
        matplotlib.use("Agg")
    bar = _progress(args.steps, "steps", disable=args.no_progress)

    def progress(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)

    start = time.perf_counter()
    result, _, _ = train_char_lm(
        backend,
        steps=args.steps,
        hidden_size=args.hidden_size,
        dtype=args.dtype,
        seed=args.seed,
        progress=progress,
        checkpoint=args.checkpoint,
    )
    bar.close()
    print(
        f"character-level LSTM on the Declaration of Independence, {args.steps} steps, "
        f"{time.perf_counter() - start:.1f} s on {args.backend}\n"
        f"  training loss      {result.losses[0]:.3f} -> {result.losses[-1]:.3f} nats/char\n"
        f"  held-out loss      {result.held_out:.3f} nats/char "
        f"(perplexity {result.perplexity:.1f})\n"
        f"  unigram baseline   {result.unigram:.3f} nats/char "
        f"(perplexity {result.unigram_perplexity:.1f})\n"
        f"  checkpoint         {args.checkpoint}"
    )
    if args.plot is not None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(result.losses) + 1), result.losses, label="training loss")
        ax.axhline(result.unigram, color="gray", linestyle="--", label="unigram baseline")
        ax.axhline(result.held_out, color="tab:red", linestyle=":", label="final held-out loss")
        ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="rnn-xp train")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"  loss curve         {args.plot}")
    return 0 if result.held_out < result.unigram else 1
