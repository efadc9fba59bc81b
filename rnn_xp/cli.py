"""The ``rnn-xp`` command (also ``python -m rnn_xp``).

Subcommands: ``check`` (the default), ``bench``, ``init``, ``convert``, ``run`` and
``train``. Every argument is checked before any work and before any file is
created; a problem prints one line on stderr, ``rnn-xp: error: OPTION: ...``,
naming the option as typed, and exits with status 2, without a traceback.
Outputs are written under a temporary name and renamed when complete; no
output may be one of the inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import _argtypes
from ._backends import BackendUnavailable
from .batch import (
    BatchError,
    RunFailed,
    backend_for,
    check_not_an_input,
    check_output_path,
    check_space,
    human_bytes,
    physical_memory,
)
from .io import WeightsError, partial_path
from .model import MODES, TORCH_MODES, Recurrent

PROG = "rnn-xp"
DESCRIPTION = (
    "Recurrent networks (Elman RNN, LSTM, GRU) written once against the Python array API. "
    "Run 'rnn-xp COMMAND --help' for a command's options. With no command, or with only "
    "options, it runs check."
)
WEIGHTS_SUFFIXES = (".npz", ".safetensors")
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".eps", ".ps")


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line."""


# -- argument types: argparse names the option in its message ------------------------


def _parser() -> argparse.ArgumentParser:
    parser = _argtypes.Parser(prog=PROG, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "check",
        help="Cross-backend agreement table of the notebook-sized example (the default).",
        add_help=False,
    )
    sub.add_parser("bench", help="The benchmark suite (see BENCHMARKS.md).", add_help=False)

    p = sub.add_parser(
        "init",
        help="Write fresh weights of a new model.",
        description="Write the freshly initialized weights of a new model to a file.",
    )
    p.add_argument("--mode", required=True, choices=list(MODES), help="The cell kind. Required.")
    p.add_argument(
        "--input-size",
        required=True,
        type=_argtypes.positive,
        metavar="D",
        help="Features per time step of the input. Required.",
    )
    p.add_argument(
        "--hidden-size",
        required=True,
        type=_argtypes.positive,
        metavar="H",
        help="Features of the hidden state. Required.",
    )
    p.add_argument(
        "--num-layers",
        type=_argtypes.positive,
        default=1,
        metavar="L",
        help="Stacked layers. Default: 1.",
    )
    p.add_argument(
        "--bidirectional",
        action="store_true",
        help="Add a reverse direction to every layer. Default: off.",
    )
    p.add_argument("--no-bias", action="store_true", help="Leave out the biases. Default: off.")
    p.add_argument(
        "--seed",
        type=_argtypes.seed,
        default=None,
        metavar="S",
        help="Seed of the initialization, a non-negative integer. Default: none (random).",
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "float32", "float64"],
        default="float32",
        help="Parameter dtype. Default: float32.",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="W",
        help="The weights file to write, .npz or .safetensors (extra io). Required.",
    )

    p = sub.add_parser(
        "convert",
        help="Convert a torch state_dict (.pt) to .npz/.safetensors.",
        description="Convert the state_dict of a torch.nn.RNN, LSTM or GRU, saved with "
        "torch.save, into an rnn-xp weights file.",
    )
    p.add_argument("source", metavar="SOURCE", help="The torch state_dict file to read (.pt).")
    p.add_argument(
        "target",
        metavar="TARGET",
        help="The weights file to write, .npz or .safetensors (extra io).",
    )
    p.add_argument(
        "--mode",
        choices=list(TORCH_MODES),
        help="The cell kind; needed for a plain RNN (rnn_tanh or rnn_relu), whose state_dict "
        "does not say its nonlinearity. Default: inferred from the state_dict.",
    )
    p.add_argument(
        "--batch-first",
        action="store_true",
        help="Record that the model takes (N, T, D) inputs. Default: off, (T, N, D).",
    )

    p = sub.add_parser(
        "export",
        help="Export a model file to ONNX.",
        description="Write a saved model as an ONNX graph of ONNX's own RNN, LSTM and GRU "
        "operators, with symbolic batch and time dimensions, checked by onnx.checker (extra "
        "onnx). A cell of your own, the LayerNorm LSTM and proj_size are refused.",
    )
    p.add_argument("weights", metavar="W", help="The model file to read (.npz or .safetensors).")
    p.add_argument("target", metavar="OUT", help="The ONNX file to write (.onnx).")
    p.add_argument(
        "--opset",
        type=_argtypes.positive,
        default=None,
        metavar="N",
        help="The ONNX opset, from 14 to the installed onnx's newest. Default: 17.",
    )
    p.add_argument(
        "--lengths",
        action="store_true",
        help="Add the input lengths (int64, (N,)), ONNX's sequence_lens. Default: off.",
    )
    p.add_argument(
        "--initial-state",
        action="store_true",
        help="Add the inputs h0 (and c0 for LSTM). Default: off, zero initial states.",
    )

    p = sub.add_parser(
        "run",
        help="Run a model over a .npy of sequences, in chunks.",
        description="Run a saved model over a .npy file of sequences, chunk by chunk, and "
        "write the outputs (and final states) to .npy files.",
    )
    p.add_argument(
        "--weights", required=True, metavar="W", help="The weights file to run. Required."
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="X.npy",
        help="The sequences, a .npy of shape (N, T, D), float16, float32 or float64. Required.",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="Y.npy",
        help="Where to write the outputs, shape (N, T, num_directions*H). Required.",
    )
    p.add_argument(
        "--backend",
        type=_argtypes.nonempty,
        default="numpy",
        help="The array library to compute with: numpy, cupy, torch or jax. Default: numpy.",
    )
    p.add_argument(
        "--device",
        type=_argtypes.nonempty,
        default=None,
        help="Where to compute: cpu, cuda or cuda:N (torch), a GPU index N or cuda:N "
        "(cupy, torch), cpu or gpu (jax). Default: the library's default device.",
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "float32", "float64"],
        default=None,
        help="The computation and output dtype. Default: the result type of the input's and "
        "the weights' dtypes.",
    )
    p.add_argument(
        "--batch-size",
        type=_argtypes.integer,  # its range is checked by batch.prepare, which names it too
        default=1024,
        metavar="B",
        help="Sequences per chunk. Default: 1024.",
    )
    p.add_argument(
        "--lengths",
        default=None,
        metavar="L.npy",
        help="Valid length of each sequence, a .npy of N integers in [1, T]. "
        "Default: every sequence is T steps long.",
    )
    p.add_argument(
        "--state-out",
        default=None,
        metavar="S.npy",
        help="Where to write the final states. Default: not written.",
    )
    p.add_argument(
        "--jobs",
        type=_argtypes.positive,
        default=None,
        metavar="J",
        help="Chunks computed at once, each in a thread of its own (NumPy runs its "
        "elementwise work on one core). For --backend numpy, and torch on the CPU; other "
        "backends take 1. With more than one chunk, BLAS (torch) is held to one thread "
        "whatever J, so the output is the same, bit for bit, whatever J. Default: the cores "
        "this process may use (fewer if their chunks would not fit in memory, and no more "
        "than there are chunks).",
    )
    p.add_argument(
        "--scheduler",
        type=_argtypes.nonempty,
        default=None,
        metavar="ADDRESS",
        help="Run on this dask.distributed scheduler (tcp://host:8786). Default: in this process.",
    )
    p.add_argument(
        "--workers",
        type=_argtypes.positive,
        default=None,
        metavar="K",
        help="Run on a local Dask cluster of K worker processes. Default: in this process.",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="Hide the progress bar. Default: shown."
    )

    p = sub.add_parser(
        "train",
        help="Train a character-level LSTM on a bundled text.",
        description="Train a character-level LSTM language model on the Declaration of "
        "Independence with truncated BPTT and Adam, and report its held-out loss next to "
        "the unigram baseline. An existing --checkpoint of the same settings is resumed.",
    )
    p.add_argument(
        "--steps",
        type=_argtypes.positive,
        default=300,
        help="Training steps in total, counting those of a resumed checkpoint. Default: 300.",
    )
    p.add_argument(
        "--hidden-size",
        type=_argtypes.positive,
        default=64,
        metavar="H",
        help="Features of the LSTM's state. Default: 64.",
    )
    p.add_argument(
        "--backend",
        type=_argtypes.nonempty,
        default="numpy",
        help="The array library to train with: numpy, cupy, torch or jax. Default: numpy.",
    )
    p.add_argument(
        "--device",
        type=_argtypes.nonempty,
        default=None,
        help="Where to compute, as for run. Default: the library's default device.",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="Parameter and computation dtype. Default: float32.",
    )
    p.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed", "16-mixed"],
        default="32-true",
        help="Mixed precision for the LSTM: its matrix products read bfloat16 (torch, jax) or "
        "float16 (all four) operands, its state and parameters stay float32; 16-mixed scales "
        "the loss. Needs --dtype float32. Default: 32-true (none).",
    )
    p.add_argument(
        "--seed",
        type=_argtypes.seed,
        default=0,
        help="Seed of the initialization, a non-negative integer. Default: 0.",
    )
    p.add_argument(
        "--checkpoint",
        default="rnn-xp-charlm.npz",
        metavar="W",
        help="Training state, written every 100 steps and at the end (.npz or .safetensors); "
        "if it exists and was made with the same settings, training resumes from it. "
        "Default: rnn-xp-charlm.npz.",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="Start from scratch and overwrite an existing --checkpoint. Default: resume.",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="Draw the loss curve into this image file (.png, .pdf, .svg, .eps or .ps; "
        "extra plot). Default: not drawn.",
    )
    p.add_argument(
        "--log-every",
        type=_argtypes.positive,
        default=10,
        metavar="N",
        help="Read the training loss from the device, and move the progress bar, every N "
        "steps (on a GPU each read waits for the device); 1: every step. Default: 10.",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="Hide the progress bar. Default: shown."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
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
        if args.command is None:  # pragma: no cover (argv is never empty here)
            return 0
        command = {
            "init": init,
            "convert": convert,
            "export": export,
            "run": run,
            "train": train,
        }[args.command]
        with _terminated_as_exit():
            return command(args)
    except (CLIError, BatchError, BackendUnavailable, WeightsError) as exc:
        return _error(exc)
    except (ValueError, TypeError) as exc:  # a last resort: still one line
        return _error(exc)
    except RunFailed as exc:  # `run`'s backend, during the work (a device error)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{PROG}: error: out of memory", file=sys.stderr)
        return 1
    except OSError as exc:  # during the work: a full disk, a file removed under us
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _terminated_as_exit():
    """SIGTERM (a job scheduler's stop) unwinds like Ctrl-C: temporary files are removed."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(exc: BaseException) -> int:
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever it holds
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return 2


# -- outputs of init, convert and train ----------------------------------------------


def _weights_output(path: str, option: str) -> str:
    """Check a weights file to be written (suffix, folder, temporary name, safetensors)."""
    path = check_output_path(path, option, WEIGHTS_SUFFIXES, [partial_path(path)])
    if path.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise CLIError(
            f"{option}: writing .safetensors needs the safetensors package; "
            "pip install 'rnn-xp[io]'"
        )
    return path


def parameter_count(
    mode: str, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, bias: bool
) -> tuple[int, int, int]:
    """``(total, largest, arrays)``: the model's parameter count, its largest array's size
    and its number of arrays."""
    # In closed form from the first two layers (every later one is the second's
    # like): --num-layers may be huge, and is then refused by its size.
    model = Recurrent._configured(
        mode, input_size, hidden_size, min(num_layers, 2), bias, bidirectional=bidirectional
    )
    dirs = model.num_directions
    layers = [
        [math.prod(p.shape) for p in model._layer_specs(k).values()]
        for k in range(model.num_layers)
    ]
    total = dirs * (sum(layers[0]) + (num_layers - 1) * sum(layers[-1]))
    largest = max(max(sizes) for sizes in layers)
    return total, largest, num_layers * dirs * len(layers[0])


def _check_memory(needed: int, options: str, what: str) -> None:
    memory = physical_memory()
    if memory is not None and needed > memory:
        raise CLIError(
            f"{options}: {what} needs about {human_bytes(needed)} of memory, more than this "
            f"machine's {human_bytes(memory)}"
        )


def init(args: argparse.Namespace) -> int:
    out = _weights_output(args.out, "--out")
    total, largest, arrays = parameter_count(
        args.mode,
        args.input_size,
        args.hidden_size,
        args.num_layers,
        args.bidirectional,
        not args.no_bias,
    )
    itemsize = {"float16": 2, "float32": 4, "float64": 8}[args.dtype]
    sizes = "--hidden-size, --input-size, --num-layers"
    what = f"a {args.mode} model of {total:,} parameters ({args.dtype})"
    # Each array also costs its Python object and, on disk, its archive entry
    # and header: a few hundred bytes, which dominate for many tiny layers.
    # The parameters, plus one float64 draw of the largest before rounding to dtype.
    _check_memory(total * itemsize + largest * 8 + 1024 * arrays, sizes, what)
    check_space(out, "--out", total * itemsize + 512 * arrays)
    try:
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
    except MemoryError:
        raise CLIError(f"{sizes}: not enough memory for {what}") from None
    return _save(model, out, "--out")


def _save(model: Recurrent, path: str, option: str) -> int:
    try:
        model.save(path)
    except WeightsError as exc:
        raise CLIError(f"{option}: {exc.detail}") from None
    print(
        f"wrote {path}: {model.mode}, D={model.input_size}, H={model.hidden_size}, "
        f"{model.num_layers} layer(s){', bidirectional' if model.bidirectional else ''}"
    )
    return 0


def convert(args: argparse.Namespace) -> int:
    source = args.source  # load_torch checks it (missing, a folder, empty, ...) as SOURCE
    target = _weights_output(args.target, "TARGET")
    check_not_an_input({"TARGET": [target, partial_path(target)]}, {"SOURCE": source})
    from .io import load_torch

    try:  # every failure of reading the file is a WeightsError, torch missing included
        model = load_torch(source, mode=args.mode, batch_first=args.batch_first)
    except WeightsError as exc:
        option = {"mode": "--mode"}.get(exc.argument, "SOURCE")
        raise CLIError(f"{option}: {exc.detail}") from None
    except MemoryError:
        raise CLIError(f"SOURCE: {source!r} is too large to convert here") from None
    return _save(model, target, "TARGET")


def export(args: argparse.Namespace) -> int:
    from .batch import load_weights

    target = check_output_path(args.target, "OUT", (".onnx",), [args.target + ".partial"])
    check_not_an_input({"OUT": [target, args.target + ".partial"]}, {"W": args.weights})
    if importlib.util.find_spec("onnx") is None:
        raise CLIError("OUT: writing ONNX needs the onnx package; pip install 'rnn-xp[onnx]'")
    model = load_weights(args.weights, "W")
    try:
        model.to_onnx(target, args.opset, lengths=args.lengths, initial_state=args.initial_state)
    except ValueError as exc:  # what ONNX cannot express, or an opset out of range
        argument, _, detail = str(exc).partition(": ")
        raise CLIError(f"{'--opset' if argument == 'opset' else 'W'}: {detail}") from None
    print(f"wrote {target}: {model!r} as ONNX")
    return 0


# -- run -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from . import batch

    if args.scheduler is not None and args.workers is not None:
        raise CLIError("--workers: give --scheduler or --workers, not both")
    distributed = args.scheduler is not None or args.workers is not None
    if distributed and importlib.util.find_spec("distributed") is None:
        option = "--scheduler" if args.scheduler is not None else "--workers"
        raise CLIError(f"{option}: needs dask.distributed; pip install 'rnn-xp[dask]'")
    if distributed and args.jobs is not None:
        option = "--scheduler" if args.scheduler is not None else "--workers"
        raise CLIError(
            f"--jobs: applies to a run in this process; with {option} each worker computes "
            "one chunk at a time"
        )
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
        jobs=1 if distributed else args.jobs,
    )
    if not distributed:
        bar = _progress(job.N, "sequences", disable=args.no_progress)
        batch.run_file(job, progress=bar.update)
        bar.close()
        return 0
    from distributed import Client, LocalCluster

    if args.scheduler is not None:
        try:
            client = Client(args.scheduler, timeout=30)
        except (OSError, ValueError, TypeError) as exc:
            text = " ".join(str(exc).split())
            raise CLIError(f"--scheduler: cannot connect to {args.scheduler!r} ({text})") from None
        with client:
            bar = _progress(job.N, "sequences", disable=args.no_progress)
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
            bar = _progress(job.N, "sequences", disable=args.no_progress)
            batch.run_file_distributed(job, client, progress=bar.update)
    bar.close()
    return 0


def _progress(total: int | None, unit: str, disable: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit=" " + unit,
        unit_scale=True,
        disable=disable,
        file=sys.stderr,
    )


# -- train ---------------------------------------------------------------------------


def _plot_output(plot: str) -> str:
    try:
        import matplotlib
    except ImportError:
        raise CLIError(
            "--plot: drawing the loss curve needs matplotlib; pip install 'rnn-xp[plot]'"
        ) from None
    matplotlib.use("Agg")
    return check_output_path(plot, "--plot", PLOT_SUFFIXES, [plot + ".partial"])


def _setting(name: str, value: object) -> object:
    """A checkpoint's setting as its option shows it: no policy is '32-true'."""
    return "32-true" if name == "precision" and value is None else value


def train(args: argparse.Namespace) -> int:
    from .train import (
        CheckpointError,
        load_text,
        read_checkpoint,
        settings_of,
        train_char_lm,
    )

    backend = backend_for(args.backend, args.device)
    precision = None if args.precision == "32-true" else args.precision
    if precision is not None:
        from . import _mixed
        from .precision import Policy

        if args.dtype != "float32":
            raise CLIError(
                f"--precision: {precision} keeps the parameters in float32; give --dtype "
                f"float32, not {args.dtype}"
            )
        try:
            _mixed.namespace(backend.xp, Policy(precision))
        except _mixed.PolicyUnsupported:
            raise CLIError(
                f"--precision: --backend {args.backend} cannot run {precision} (its library has "
                f"no {Policy(precision).operand} dtype); use --precision 16-mixed, or --backend "
                "torch or jax"
            ) from None
    V, H = len(set(load_text())), args.hidden_size
    seq_len, batch = 32, 16
    itemsize = 4 if args.dtype == "float32" else 8
    total, _, _ = parameter_count("lstm", V, H, 1, False, True)
    total += H * V + V  # the readout
    # Parameters, gradients, Adam's two moments, the updated copy, the model's
    # own; plus one step's activations and backward cache.
    needed = itemsize * (6 * total + batch * seq_len * (4 * V + 16 * H))
    _check_memory(needed, "--hidden-size", f"training with --hidden-size {H}")
    checkpoint = _weights_output(args.checkpoint, "--checkpoint")
    outputs = {"--checkpoint": [checkpoint, partial_path(checkpoint)]}
    if args.plot is not None:
        outputs["--plot"] = [_plot_output(args.plot), args.plot + ".partial"]
    check_not_an_input(outputs, {})

    settings = settings_of(H, seq_len, batch, 0.01, args.dtype, args.seed, precision)
    resume = None
    if os.path.exists(checkpoint) and not args.restart:
        how = "give another --checkpoint path, or --restart to start over and overwrite it"
        try:
            resume = read_checkpoint(checkpoint)
        except CheckpointError as exc:
            raise CLIError(
                f"--checkpoint: {checkpoint!r} exists and is not an rnn-xp train checkpoint "
                f"to resume: it {exc.detail}; {how}"
            ) from None
        differ = resume.mismatches(settings)
        if differ:
            names = {
                "hidden_size": "--hidden-size",
                "dtype": "--dtype",
                "seed": "--seed",
                "precision": "--precision",
            }
            diff = ", ".join(
                f"{names.get(k, k)} {_setting(k, a)} (not {_setting(k, b)})"
                for k, (a, b) in differ.items()
            )
            raise CLIError(
                f"--checkpoint: {checkpoint!r} was made with {diff}; give the same settings "
                f"to resume it, or {how}"
            )
    done = 0 if resume is None else resume.step
    if resume is not None:
        if done >= args.steps:
            print(
                f"{checkpoint} is already at step {done} (--steps {args.steps}): nothing to "
                f"train; give a larger --steps to continue"
            )
        else:
            print(f"resuming {checkpoint} at step {done} of {args.steps}")
    shown = min(done, args.steps)
    bar = _progress(args.steps, "steps", disable=args.no_progress, initial=shown)

    def progress(step: int, loss: float) -> None:  # called every --log-every steps
        nonlocal shown
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(step - shown)
        shown = step

    start = time.perf_counter()
    try:
        result, _, _ = train_char_lm(
            backend,
            steps=args.steps,
            hidden_size=H,
            seq_len=seq_len,
            batch=batch,
            dtype=args.dtype,
            seed=args.seed,
            progress=progress,
            checkpoint=checkpoint,
            resume=resume,
            log_every=args.log_every,
            precision=precision,
        )
    except WeightsError as exc:  # writing the checkpoint failed
        raise CLIError(f"--checkpoint: {exc.detail}") from None
    finally:
        bar.close()
    trained = max(0, args.steps - done)
    steps_text = f"{len(result.losses)} steps" + (
        f" ({trained} in this run)" if resume is not None else ""
    )
    margin = result.unigram - result.held_out
    if math.isfinite(margin) and margin > 0:
        verdict = f"the held-out loss beats the unigram baseline by {margin:.3f} nats/char"
    else:
        verdict = (
            f"the held-out loss does NOT beat the unigram baseline ({result.held_out:.3f} >= "
            f"{result.unigram:.3f} nats/char); train longer (a larger --steps resumes "
            "the checkpoint)"
        )
    print(
        f"character-level LSTM on the Declaration of Independence, {steps_text}, "
        f"{time.perf_counter() - start:.1f} s on {args.backend}"
        f"{'' if precision is None else ', ' + precision}\n"
        f"  training loss      {result.losses[0]:.3f} -> {result.losses[-1]:.3f} nats/char\n"
        f"  held-out loss      {result.held_out:.3f} nats/char "
        f"(perplexity {result.perplexity:.1f})\n"
        f"  unigram baseline   {result.unigram:.3f} nats/char "
        f"(perplexity {result.unigram_perplexity:.1f})\n"
        f"  comparison         {verdict}\n"
        f"  checkpoint         {checkpoint} (step {len(result.losses)})"
    )
    if args.plot is not None:
        _draw(result, args.plot)
        print(f"  loss curve         {args.plot}")
    return 0


def _draw(result, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(result.losses) + 1), result.losses, label="training loss")
    ax.axhline(result.unigram, color="gray", linestyle="--", label="unigram baseline")
    ax.axhline(result.held_out, color="tab:red", linestyle=":", label="final held-out loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="rnn-xp train")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".partial"
    # A stale temporary file goes first (one that is a link was refused up
    # front); the new one is created exclusively, never through a link.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, dpi=100, format=Path(path).suffix[1:])
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
