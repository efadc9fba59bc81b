"""The ``rnn-xp`` command (also ``python -m rnn_xp``).

Subcommands: ``check`` (the default), ``bench``, ``init``, ``convert``, ``run`` and
``train``. A problem with the input prints one line on stderr, ``rnn-xp: error:
...``, and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ._backends import BackendUnavailable
from .batch import BatchError, backend_for
from .model import MODES, Recurrent


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
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run on this dask.distributed scheduler (tcp://host:8786)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="K",
        help="run on a local Dask cluster of K worker processes",
    )
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
    except (
        CLIError,
        BatchError,
        BackendUnavailable,
        FileNotFoundError,
        ValueError,
        TypeError,
    ) as exc:
        print(f"rnn-xp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnn-xp: interrupted", file=sys.stderr)
        return 130


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
    return _save(model, args.out)


def _save(model: Recurrent, path: str) -> int:
    model.save(path)
    print(
        f"wrote {path}: {model.mode}, D={model.input_size}, H={model.hidden_size}, "
        f"{model.num_layers} layer(s){', bidirectional' if model.bidirectional else ''}"
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
    return _save(model, args.target)


def run(args: argparse.Namespace) -> int:
    from . import batch

    job = batch.prepare(
        args.weights,
        args.input,
        args.out,
        batch_size=args.batch_size,
        lengths=args.lengths,
        state_out=args.state_out,
        dtype=args.dtype,
        backend=args.backend,
        device=args.device,
    )
    bar = _progress(job.N, "sequences", disable=args.no_progress)
    if args.scheduler is None and args.workers is None:
        batch.run_file(job, progress=bar.update)
    else:
        from distributed import Client, LocalCluster

        if args.scheduler is not None:
            with Client(args.scheduler) as client:
                batch.run_file_distributed(job, client, progress=bar.update)
        else:
            with (
                LocalCluster(
                    n_workers=args.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                ) as cluster,
                Client(cluster) as client,
            ):
                batch.run_file_distributed(job, client, progress=bar.update)
    bar.close()
    return 0


def _progress(total: int | None, unit: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=" " + unit, unit_scale=True, disable=disable, file=sys.stderr)


def train(args: argparse.Namespace) -> int:
    from .train import train_char_lm

    backend = backend_for(args.backend, args.device)
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
