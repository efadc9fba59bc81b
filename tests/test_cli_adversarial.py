"""The rnn-xp command under bad arguments, and the promises it keeps.

Every bad argument to every subcommand (init, convert, run, train, check,
bench) gets exit status 2 and one line on stderr, ``rnn-xp: error: OPTION:
...`` naming the option as typed (argparse's own errors too, without the
usage), no traceback, no file created (not even a ``.partial``) and no input
changed. Most cases call `rnn_xp.cli.main` in this
process; a few go end to end through a subprocess.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass

import numpy as np
import pytest

import rnn_xp
from rnn_xp import _backends, batch, cli
from tests.support import call
from tests.test_cli import rnn_xp_cmd

# -- the files every case starts from -------------------------------------------------

X = np.random.default_rng(0).standard_normal((10, 7, 4)).astype(np.float32)
LENGTHS = np.array([7, 3, 5, 1, 2, 7, 7, 6, 4, 2])


def _write_inputs(d) -> None:
    rnn_xp.Recurrent("lstm", 4, 5, 2, bidirectional=True, batch_first=True, seed=1).save(
        d / "w.npz"
    )
    rnn_xp.Recurrent("gru", 4, 5, 3, dropout=0.5, batch_first=True, seed=2).save(d / "drop.npz")
    np.save(d / "x.npy", X)
    np.save(d / "l.npy", LENGTHS)
    np.save(d / "l_last.npy", np.r_[LENGTHS[:-1], 8])  # T + 1, in the very last place
    np.save(d / "l_zero.npy", np.r_[0, LENGTHS[1:]])
    np.save(d / "l_float.npy", LENGTHS.astype(np.float64))
    np.save(d / "l_bool.npy", LENGTHS > 3)
    np.save(d / "l_short.npy", LENGTHS[:3])
    np.save(d / "l_u8bad.npy", np.r_[LENGTHS[:-1], 255].astype(np.uint8))
    np.save(d / "x_t0.npy", np.zeros((10, 0, 4), np.float32))
    np.save(d / "x_2d.npy", np.zeros((10, 7), np.float32))
    np.save(d / "x_d5.npy", np.zeros((10, 7, 5), np.float32))
    np.save(d / "x_int.npy", np.zeros((10, 7, 4), np.int32))
    np.save(d / "x_bool.npy", np.zeros((10, 7, 4), bool))
    np.save(d / "x_cplx.npy", np.zeros((10, 7, 4), np.complex64))
    np.save(d / "x_str.npy", np.array(["a", "b"]))
    np.save(d / "x_obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with open(d / "x.npy", "rb") as f:
        (d / "x_trunc.npy").write_bytes(f.read(300))
    (d / "x_text.npy").write_text("not an array\n")
    for name, shape in [("x_huge.npy", (2**40, 10**6, 4)), ("l_huge.npy", (2**62,))]:
        with open(d / name, "wb") as f:  # a header claiming far more than the file holds
            header = {"descr": "<f4" if name[0] == "x" else "<i8", "fortran_order": False}
            np.lib.format.write_array_header_1_0(f, header | {"shape": shape})
            f.write(b"\0" * 64)
    (d / "x_empty.npy").write_bytes(b"")
    np.savez(d / "x_arch.npz", x=X)
    np.save(d / "x.npy.partial", X)  # an input named like the temporary file of --out x.npy
    (d / "w_garbage.npz").write_text("not weights\n")
    for folder in ("adir", "adir.npy", "adir.npz", "x_dir.npy", "busy.npy.partial"):
        (d / folder).mkdir()
    (d / "busyw.npz.partial.npz").mkdir()  # the temporary name rnn_xp.io.save writes under
    os.mkfifo(d / "fifo.npy")
    os.mkfifo(d / "fifo.npz")
    try:
        import torch
    except ImportError:  # pragma: no cover (the convert cases are then skipped)
        return
    torch.save(torch.nn.GRU(4, 6).state_dict(), d / "m.pt")
    torch.save(torch.nn.RNN(4, 6).state_dict(), d / "r.pt")
    torch.save([1, 2], d / "list.pt")
    (d / "garbage.pt").write_bytes(b"hello world")


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A real training checkpoint: 1 step, --hidden-size 4, --seed 0, float32."""
    d = tmp_path_factory.mktemp("ckpt")
    rc = cli.main(
        [*("train", "--steps", "1", "--hidden-size", "4"), "--checkpoint", str(d / "c.npz")]
    )
    assert rc == 0
    return (d / "c.npz").read_bytes()


@pytest.fixture
def work(tmp_path, monkeypatch, checkpoint_bytes, capsys):
    _write_inputs(tmp_path)
    (tmp_path / "ckpt.npz").write_bytes(checkpoint_bytes)
    with np.load(tmp_path / "ckpt.npz") as f:  # the same, one of Adam's moments missing
        kept = {k: f[k] for k in f.files if k != "extra.train.adam.m.readout.W"}
    np.savez(tmp_path / "ckpt_cut.npz", **kept)
    os.symlink("x.npy", tmp_path / "x_link.npy")
    os.link(tmp_path / "x.npy", tmp_path / "x_hard.npy")
    os.symlink("l.npy", tmp_path / "l_link.npy")
    os.symlink("w.npz", tmp_path / "w_link.npy")
    os.symlink("missing.npy", tmp_path / "x_broken.npy")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # what the checkpoint fixture printed
    return tmp_path


def snapshot(d) -> dict[str, tuple]:
    """Every entry under ``d``: its kind and, for files, content hash and mtime."""
    state = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, d)
            st = os.lstat(path)
            if os.path.islink(path):
                state[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                state[rel] = ("file", digest, st.st_mtime_ns, st.st_ino)
            else:
                state[rel] = ("other", st.st_mode)
    return state


# -- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    argv: list[str]
    prefix: str  # the error line starts with "rnn-xp: error: " + prefix (usage: "...error: ")
    contains: tuple[str, ...] = ()
    usage: bool = False  # found by argparse itself (the line then names the option its way)
    needs: str | None = None  # "torch", "no-cuda", "no-cupy", "no-jax-gpu"
    lacks: tuple[str, ...] = ()  # must not appear in the message


def run_args(*extra, weights="w.npz", input="x.npy", out="y.npy"):
    return ["run", "--weights", weights, "--input", input, "--out", out, *extra]


INIT = ["init", "--mode", "lstm", "--input-size", "4", "--hidden-size", "5"]
TRAIN = ["train", "--steps", "2", "--hidden-size", "4", "--no-progress"]
SAME = "no output may overwrite an input"

CASES = {
    # run: an output that is an input, under any name
    "run-out-is-input": Case(run_args(out="x.npy"), "--out: 'x.npy' is the same file as --input"),
    "run-out-is-input-symlink": Case(
        run_args(out="x_link.npy"), "--out: 'x_link.npy' is the same file as --input 'x.npy'"
    ),
    "run-out-is-input-hardlink": Case(
        run_args(out="x_hard.npy"), "--out: 'x_hard.npy' is the same file as --input 'x.npy'"
    ),
    "run-out-is-input-by-path": Case(
        run_args(out="adir/../x.npy"), "--out: 'adir/../x.npy' is the same file as --input"
    ),
    "run-out-partial-is-input": Case(
        run_args(input="x.npy.partial", out="x.npy"),
        "--out: its temporary file 'x.npy.partial' is the same file as --input 'x.npy.partial'",
        (SAME,),
    ),
    "run-out-is-weights-symlink": Case(
        run_args(out="w_link.npy"), "--out: 'w_link.npy' is the same file as --weights 'w.npz'"
    ),
    "run-out-is-lengths": Case(
        run_args("--lengths", "l_link.npy", out="l.npy"),
        "--out: 'l.npy' is the same file as --lengths 'l_link.npy'",
    ),
    "run-state-out-is-input": Case(
        run_args("--state-out", "x_hard.npy"), "--state-out: 'x_hard.npy' is the same file as"
    ),
    "run-state-out-is-out": Case(
        run_args("--state-out", "y.npy"), "--state-out: 'y.npy' is the same file as --out"
    ),
    # run: outputs that cannot be written
    "run-out-folder": Case(run_args(out="adir.npy"), "--out: 'adir.npy' is a folder"),
    "run-out-no-folder": Case(
        run_args(out="nowhere/y.npy"), "--out: the folder", ("does not exist",)
    ),
    "run-out-suffix": Case(run_args(out="y.npz"), "--out: expected a .npy file name, got 'y.npz'"),
    "run-out-fifo": Case(
        run_args(out="fifo.npy"), "--out: 'fifo.npy' exists and is not a regular file"
    ),
    "run-out-partial-folder": Case(
        run_args(out="busy.npy"), "--out: its temporary file 'busy.npy.partial' exists"
    ),
    "run-out-empty-name": Case(run_args(out=""), "--out: expected a file name, got ''"),
    "run-state-out-folder": Case(
        run_args("--state-out", "adir.npy"), "--state-out: 'adir.npy' is a folder"
    ),
    # run: the input
    "run-input-missing": Case(run_args(input="nope.npy"), "--input: no such file 'nope.npy'"),
    "run-input-broken-link": Case(
        run_args(input="x_broken.npy"), "--input: 'x_broken.npy' is a broken symbolic link"
    ),
    "run-input-folder": Case(run_args(input="x_dir.npy"), "--input: 'x_dir.npy' is a folder"),
    "run-input-fifo": Case(run_args(input="fifo.npy"), "--input: 'fifo.npy' is not a regular"),
    "run-input-empty": Case(run_args(input="x_empty.npy"), "--input: 'x_empty.npy' is empty"),
    "run-input-npz": Case(
        run_args(input="x_arch.npz"),
        "--input: 'x_arch.npz' is a .npz archive",
        ("expected a .npy file",),
    ),
    "run-input-text": Case(
        run_args(input="x_text.npy"), "--input: 'x_text.npy' is not a .npy file"
    ),
    "run-input-truncated": Case(
        run_args(input="x_trunc.npy"), "--input: 'x_trunc.npy' holds 172 data bytes; its header"
    ),
    "run-input-huge-header": Case(
        run_args(input="x_huge.npy"), "--input: 'x_huge.npy' holds 64 data bytes; its header"
    ),
    "run-lengths-huge-header": Case(
        run_args("--lengths", "l_huge.npy"), "--lengths: 'l_huge.npy' holds 64 data bytes"
    ),
    "run-input-objects": Case(
        run_args(input="x_obj.npy"), "--input: 'x_obj.npy' holds Python objects (pickled data)"
    ),
    "run-input-int": Case(
        run_args(input="x_int.npy"),
        "--input: expected real floating values (float16, float32 or float64), got int32",
    ),
    "run-input-bool": Case(
        run_args(input="x_bool.npy"), "--input: expected real floating values", ("got bool",)
    ),
    "run-input-complex": Case(
        run_args(input="x_cplx.npy"), "--input: expected real floating", ("complex64",)
    ),
    "run-input-strings": Case(
        run_args(input="x_str.npy"), "--input: expected real floating", ("<U1",)
    ),
    "run-input-2d": Case(
        run_args(input="x_2d.npy"), "--input: expected shape (N, T, D=4)", ("got (10, 7)",)
    ),
    "run-input-wrong-d": Case(
        run_args(input="x_d5.npy"), "--input: expected shape (N, T, D=4)", ("got (10, 7, 5)",)
    ),
    "run-input-no-steps": Case(
        run_args(input="x_t0.npy"),
        "--input: expected at least one time step, got shape (10, 0, 4)",
    ),
    # run: the lengths, all of them, before any work
    "run-lengths-last-too-long": Case(
        run_args("--lengths", "l_last.npy", "--batch-size", "2"),
        "--lengths: expected every length in [1, T=7], got 8 at index 9",
    ),
    "run-lengths-zero": Case(
        run_args("--lengths", "l_zero.npy"),
        "--lengths: expected every length in [1, T=7], got 0 at index 0",
    ),
    "run-lengths-uint-too-long": Case(
        run_args("--lengths", "l_u8bad.npy"), "--lengths: expected every length in [1, T=7]"
    ),
    "run-lengths-float": Case(
        run_args("--lengths", "l_float.npy"), "--lengths: expected integers", ("float64",)
    ),
    "run-lengths-bool": Case(
        run_args("--lengths", "l_bool.npy"), "--lengths: expected integers", ("bool",)
    ),
    "run-lengths-shape": Case(
        run_args("--lengths", "l_short.npy"), "--lengths: expected shape (N,) = (10,)"
    ),
    "run-lengths-missing": Case(
        run_args("--lengths", "nope.npy"), "--lengths: no such file 'nope.npy'"
    ),
    # run: the weights
    "run-weights-missing": Case(run_args(weights="nope.npz"), "--weights: ", ("nope.npz",)),
    "run-weights-folder": Case(run_args(weights="adir.npz"), "--weights: ", ("adir.npz",)),
    "run-weights-suffix": Case(run_args(weights="x.npy"), "--weights: ", (".npz",)),
    "run-weights-garbage": Case(run_args(weights="w_garbage.npz"), "--weights: "),
    # run: numbers, backends and devices
    "run-batch-size-zero": Case(
        run_args("--batch-size", "0"), "--batch-size: expected a positive integer, got 0"
    ),
    "run-batch-size-negative": Case(
        run_args("--batch-size", "-1"), "--batch-size: expected a positive integer, got -1"
    ),
    "run-batch-size-text": Case(
        run_args("--batch-size", "many"),
        "argument --batch-size: expected an integer, got 'many'",
        usage=True,
    ),
    "run-workers-zero": Case(
        run_args("--workers", "0"), "argument --workers: expected a positive", usage=True
    ),
    "run-scheduler-and-workers": Case(
        run_args("--scheduler", "tcp://localhost:1", "--workers", "2"),
        "--workers: give --scheduler or --workers, not both",
    ),
    "run-scheduler-bad-address": Case(
        run_args("--scheduler", "nonsense"), "--scheduler: cannot connect to 'nonsense'"
    ),
    "run-dtype": Case(
        run_args("--dtype", "int32"), "argument --dtype: invalid choice: 'int32'", usage=True
    ),
    "run-backend": Case(
        run_args("--backend", "tensorflow"),
        "--backend: expected one of numpy, torch, jax, cupy, got 'tensorflow'",
    ),
    "run-backend-empty": Case(
        run_args("--backend", ""), "argument --backend: expected a non-empty", usage=True
    ),
    "run-numpy-on-gpu": Case(
        run_args("--device", "gpu"), "--device: NumPy runs on the CPU only, not on 'gpu'"
    ),
    "run-torch-garbage-device": Case(
        run_args("--backend", "torch", "--device", "garbage"),
        "--device: PyTorch devices are cpu, cuda or cuda:N, not 'garbage'",
        needs="torch",
    ),
    "run-torch-mps": Case(
        run_args("--backend", "torch", "--device", "mps"),
        "--device: PyTorch devices are cpu, cuda or cuda:N, not 'mps'",
        needs="torch",
    ),
    "run-torch-cuda-without-gpu": Case(
        run_args("--backend", "torch", "--device", "cuda:0"),
        "--device: PyTorch",
        ("sees no CUDA GPU", "'cuda:0'"),
        needs="no-cuda",
        lacks=("pip install",),
    ),
    "run-torch-cuda-1-without-gpu": Case(
        run_args("--backend", "torch", "--device", "cuda:1"),
        "--device: PyTorch",
        ("sees no CUDA GPU",),
        needs="no-cuda",
        lacks=("pip install",),
    ),
    "run-jax-garbage-device": Case(
        run_args("--backend", "jax", "--device", "foo"),
        "--device: JAX devices are platform names",
        needs="jax",
    ),
    "run-jax-gpu-without-gpu": Case(
        run_args("--backend", "jax", "--device", "gpu"),
        "--device: JAX sees no gpu device",
        needs="no-jax-gpu",
        lacks=("pip install",),
    ),
    "run-cupy-not-installed": Case(
        run_args("--backend", "cupy"),
        "--backend: CuPy is not installed",
        ("pip install 'rnn-xp[cuda12]'",),
        needs="no-cupy",
    ),
    "run-missing-option": Case(
        ["run", "--weights", "w.npz"],
        "the following arguments are required: --input, --out",
        usage=True,
    ),
    "run-unknown-option": Case(run_args("--fast"), "unrecognized arguments: --fast", usage=True),
    # init
    "init-out-folder": Case([*INIT, "--out", "adir.npz"], "--out: 'adir.npz' is a folder"),
    "init-out-no-folder": Case(
        [*INIT, "--out", "nowhere/w.npz"], "--out: the folder", ("does not exist",)
    ),
    "init-out-suffix": Case(
        [*INIT, "--out", "w.pt"], "--out: expected a .npz or .safetensors file name, got 'w.pt'"
    ),
    "init-out-fifo": Case([*INIT, "--out", "fifo.npz"], "--out: 'fifo.npz' exists and is not"),
    "init-out-temporary-folder": Case(
        [*INIT, "--out", "busyw.npz"], "--out: its temporary file 'busyw.npz.partial.npz'"
    ),
    "init-huge": Case(
        [*INIT[:4], "8", "--hidden-size", "10000000", "--out", "big.npz"],
        "--hidden-size, --input-size, --num-layers: a lstm model of",
        ("parameters (float32) needs about", "of memory, more than this machine's"),
    ),
    "init-huge-layers": Case(
        [*INIT[:4], "8", "--hidden-size", "100000", "--num-layers", "100000", "--out", "n.npz"],
        "--hidden-size, --input-size, --num-layers:",
    ),
    "init-hidden-zero": Case(
        [*INIT[:-1], "0", "--out", "n.npz"],
        "argument --hidden-size: expected a positive integer, got 0",
        usage=True,
    ),
    "init-hidden-text": Case(
        [*INIT[:-1], "five", "--out", "n.npz"],
        "argument --hidden-size: expected a positive integer, got 'five'",
        usage=True,
    ),
    "init-layers-negative": Case(
        [*INIT, "--num-layers", "-2", "--out", "n.npz"], "argument --num-layers:", usage=True
    ),
    "init-seed-negative": Case(
        [*INIT, "--seed", "-1", "--out", "n.npz"],
        "argument --seed: expected a non-negative integer, got -1",
        usage=True,
    ),
    "init-mode": Case(
        ["init", "--mode", "transformer", *INIT[3:], "--out", "n.npz"],
        "argument --mode: invalid choice: 'transformer'",
        usage=True,
    ),
    "init-missing-out": Case(INIT, "the following arguments are required: --out", usage=True),
    # convert
    "convert-source-missing": Case(
        ["convert", "nope.pt", "o.npz"], "SOURCE: no such file 'nope.pt'"
    ),
    "convert-source-folder": Case(["convert", "adir", "o.npz"], "SOURCE: 'adir' is a folder"),
    "convert-source-empty": Case(
        ["convert", "x_empty.npy", "o.npz"], "SOURCE: 'x_empty.npy' is empty (0 bytes)"
    ),
    "convert-source-garbage": Case(
        ["convert", "garbage.pt", "o.npz"], "SOURCE: ", ("garbage.pt",), needs="torch"
    ),
    "convert-source-list": Case(
        ["convert", "list.pt", "o.npz"], "SOURCE: ", ("list.pt",), needs="torch"
    ),
    "convert-source-npy": Case(["convert", "x.npy", "o.npz"], "SOURCE: ", needs="torch"),
    "convert-target-is-source": Case(
        ["convert", "w.npz", "w.npz"], "TARGET: 'w.npz' is the same file as SOURCE 'w.npz'"
    ),
    "convert-target-suffix": Case(
        ["convert", "m.pt", "m.pt"], "TARGET: expected a .npz or .safetensors file name"
    ),
    "convert-target-folder": Case(
        ["convert", "m.pt", "adir.npz"], "TARGET: 'adir.npz' is a folder"
    ),
    "convert-target-no-folder": Case(
        ["convert", "m.pt", "nowhere/o.npz"], "TARGET: the folder", ("does not exist",)
    ),
    "convert-plain-rnn-needs-mode": Case(
        ["convert", "r.pt", "o.npz"],
        "--mode: ",
        ("give --mode rnn_tanh or --mode rnn_relu",),
        needs="torch",
    ),
    "convert-mode-mismatch": Case(
        ["convert", "m.pt", "o.npz", "--mode", "lstm"],
        "--mode: 'lstm' does not match",
        needs="torch",
    ),
    "convert-missing-target": Case(
        ["convert", "m.pt"], "the following arguments are required: TARGET", usage=True
    ),
    # train
    "train-steps-zero": Case(
        ["train", "--steps", "0"],
        "argument --steps: expected a positive integer, got 0",
        usage=True,
    ),
    "train-steps-text": Case(
        ["train", "--steps", "1e3"], "argument --steps: expected a positive", usage=True
    ),
    "train-log-every-zero": Case(
        ["train", "--log-every", "0"],
        "argument --log-every: expected a positive integer, got 0",
        usage=True,
    ),
    "train-hidden-zero": Case(
        ["train", "--hidden-size", "0"], "argument --hidden-size: expected a positive", usage=True
    ),
    "train-seed-negative": Case(
        ["train", "--seed", "-3"], "argument --seed: expected a non-negative", usage=True
    ),
    "train-hidden-huge": Case(
        [*TRAIN, "--hidden-size", "100000000", "--checkpoint", "n.npz"],
        "--hidden-size: training with --hidden-size 100000000 needs about",
    ),
    "train-backend": Case(
        [*TRAIN, "--backend", "mxnet", "--checkpoint", "n.npz"], "--backend: expected one of"
    ),
    "train-device": Case(
        [*TRAIN, "--device", "cuda:0", "--checkpoint", "n.npz"], "--device: NumPy runs on"
    ),
    "train-checkpoint-folder": Case(
        [*TRAIN, "--checkpoint", "adir.npz"], "--checkpoint: 'adir.npz' is a folder"
    ),
    "train-checkpoint-no-folder": Case(
        [*TRAIN, "--checkpoint", "nowhere/c.npz"], "--checkpoint: the folder"
    ),
    "train-checkpoint-suffix": Case(
        [*TRAIN, "--checkpoint", "c.npy"], "--checkpoint: expected a .npz or .safetensors"
    ),
    "train-checkpoint-is-weights": Case(
        [*TRAIN, "--checkpoint", "w.npz"],
        "--checkpoint: 'w.npz' exists and is not an rnn-xp train checkpoint to resume",
        ("holds a model but no training state", "--restart"),
    ),
    "train-checkpoint-garbage": Case(
        [*TRAIN, "--checkpoint", "w_garbage.npz"],
        "--checkpoint: 'w_garbage.npz' exists and is not an rnn-xp train checkpoint",
        ("another --checkpoint path", "--restart"),
    ),
    "train-checkpoint-other-hidden-size": Case(
        [*TRAIN[:3], "--hidden-size", "5", "--checkpoint", "ckpt.npz"],
        "--checkpoint: 'ckpt.npz' was made with --hidden-size 4 (not 5)",
        ("--restart",),
    ),
    "train-checkpoint-other-seed-dtype": Case(
        [*TRAIN, "--seed", "3", "--dtype", "float64", "--checkpoint", "ckpt.npz"],
        "--checkpoint: 'ckpt.npz' was made with --dtype float32 (not float64), --seed 0 (not 3)",
    ),
    "train-checkpoint-incomplete": Case(
        [*TRAIN, "--checkpoint", "ckpt_cut.npz"],
        "--checkpoint: 'ckpt_cut.npz' exists and is not an rnn-xp train checkpoint to resume: "
        "it has an incomplete training state",
    ),
    "train-plot-suffix": Case(
        [*TRAIN, "--checkpoint", "n.npz", "--plot", "loss.npz"],
        "--plot: expected a .png, .pdf, .svg, .eps or .ps file name, got 'loss.npz'",
        needs="matplotlib",
    ),
    "train-plot-folder": Case(
        [*TRAIN, "--checkpoint", "n.npz", "--plot", "adir"],
        "--plot: 'adir' is a folder",
        needs="matplotlib",
    ),
    "train-plot-no-folder": Case(
        [*TRAIN, "--checkpoint", "n.npz", "--plot", "nowhere/l.png"],
        "--plot: the folder",
        needs="matplotlib",
    ),
    # check
    "check-size-zero": Case(
        ["check", "--size", "0", "16", "100", "100"],
        "argument --size: expected a positive integer, got 0",
        usage=True,
    ),
    "check-size-three": Case(
        ["check", "--size", "1", "2", "3"], "argument --size: expected 4 arguments", usage=True
    ),
    "check-size-huge": Case(
        ["check", "--size", "100000", "100000", "100000", "100"],
        "argument --size: N=100000 T=100000 D=100000 H=100 needs about",
        usage=True,
    ),
    "check-repeat-zero": Case(
        ["check", "--repeat", "0"], "argument --repeat: expected a positive", usage=True
    ),
    "check-repeat-text": Case(
        ["check", "--repeat", "x"], "argument --repeat: expected a positive", usage=True
    ),
    "check-seed-negative": Case(
        ["check", "--seed", "-1"], "argument --seed: expected a non-negative", usage=True
    ),
    "check-backend-unknown": Case(
        ["check", "--backend", "tensorflow"], "argument --backend: invalid choice", usage=True
    ),
    "check-backend-cupy-missing": Case(
        ["check", "--backend", "cupy"],
        "--backend cupy: cannot run here: CuPy is not installed",
        needs="no-cupy",
    ),
    "check-backend-torch-cuda-missing": Case(
        ["check", "--backend", "numpy", "--backend", "torch:cuda"],
        "--backend torch:cuda: cannot run here: PyTorch",
        needs="no-cuda",
    ),
    "check-unknown-option": Case(["--fast"], "unrecognized arguments: --fast", usage=True),
    # bench
    "bench-size-zero": Case(
        ["bench", "--size", "1", "0", "1", "1"],
        "argument --size: expected a positive integer, got 0",
        usage=True,
    ),
    "bench-size-huge": Case(
        ["bench", "--size", "100000", "100000", "100000", "100"],
        "argument --size: N=100000",
        usage=True,
    ),
    "bench-rounds-zero": Case(
        ["bench", "--rounds", "0"], "argument --rounds: expected a positive", usage=True
    ),
    "bench-budget-nan": Case(
        ["bench", "--budget", "nan"], "argument --budget: expected a positive number", usage=True
    ),
    "bench-budget-negative": Case(
        ["bench", "--budget", "-1"], "argument --budget: expected a positive number", usage=True
    ),
    "bench-budget-text": Case(
        ["bench", "--budget", "soon"], "argument --budget: expected a number", usage=True
    ),
    "bench-kind": Case(["bench", "--kind", "mlp"], "argument --kind: invalid choice", usage=True),
    "bench-unknown-option": Case(
        ["bench", "--fast"], "unrecognized arguments: --fast", usage=True
    ),
    # the command itself
    "unknown-command": Case(["frobnicate"], "argument COMMAND: invalid choice", usage=True),
}


def _skip_unless(needs: str | None) -> None:
    if needs is None:
        return
    if needs in ("torch", "jax", "matplotlib"):
        pytest.importorskip(needs)
    elif needs == "no-cuda":
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is visible to PyTorch here")
    elif needs == "no-cupy":
        try:
            import cupy  # noqa: F401
        except ImportError:
            return
        pytest.skip("CuPy is installed here")
    elif needs == "no-jax-gpu":
        jax = pytest.importorskip("jax")
        try:
            jax.devices("gpu")
        except RuntimeError:
            return
        pytest.skip("JAX sees a GPU here")


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_argument(work, capsys, case):
    _skip_unless(case.needs)
    before = snapshot(work)
    rc, out, err = call(case.argv, capsys)
    assert snapshot(work) == before, "a file was created, changed or removed"
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert out == ""
    lines = err.splitlines()
    # argparse's own errors too: one line, without the usage (which --help shows).
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rnn-xp: error: {case.prefix.removeprefix('argument ')}"), lines
    for fragment in case.contains:
        assert fragment in lines[-1], lines[-1]
    for fragment in case.lacks:
        assert fragment not in lines[-1], lines[-1]
    for internal in ("xs:", "path:", "state:", "weights: ", "state_dict:"):
        assert not lines[-1].startswith(f"rnn-xp: error: {internal}"), lines[-1]


# -- cases that need the machine to look different ---------------------------------


def test_unwritable_folder_is_refused(work, capsys, monkeypatch):
    real = os.access
    locked = str(work / "adir")
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == locked else real(p, mode))
    before = snapshot(work)
    for argv, option in [
        (run_args(out="adir/y.npy"), "--out"),
        ([*INIT, "--out", "adir/w.npz"], "--out"),
        ([*TRAIN, "--checkpoint", "adir/c.npz"], "--checkpoint"),
        (["convert", "w.npz", "adir/o.npz"], "TARGET"),
    ]:
        rc, _, err = call(argv, capsys)
        assert rc == 2
        assert err == f"rnn-xp: error: {option}: cannot write in the folder {locked!r} " + (
            "(permission denied)\n"
        )
    assert snapshot(work) == before


def test_outputs_larger_than_the_free_space_are_refused(work, capsys, monkeypatch):
    monkeypatch.setattr(batch.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=100))
    before = snapshot(work)
    rc, _, err = call(run_args(), capsys)
    assert rc == 2
    assert err.startswith("rnn-xp: error: --out: the output needs 2.8 KB, but the folder ")
    assert err.endswith("has 100 bytes free\n")
    # init: many tiny layers cost their archive entries more than their values
    rc, _, err = call([*INIT[:4], "1", "--hidden-size", "1", "--out", "n.npz"], capsys)
    assert rc == 2
    assert err.startswith("rnn-xp: error: --out: the output needs 2.1 KB, but the folder "), err
    assert snapshot(work) == before


def test_a_chunk_larger_than_the_memory_is_refused(work, capsys, monkeypatch):
    monkeypatch.setattr(batch, "physical_memory", lambda: 1000)
    rc, _, err = call(run_args(), capsys)
    assert rc == 2
    assert err.startswith("rnn-xp: error: --batch-size: a chunk of 10 sequences of T=7 needs")
    assert "give a smaller --batch-size" in err


def test_safetensors_output_without_the_package(work, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "safetensors" else real(n, *a)
    )
    rc, _, err = call([*INIT, "--out", "w.safetensors"], capsys)
    assert rc == 2
    assert err == (
        "rnn-xp: error: --out: writing .safetensors needs the safetensors package; "
        "pip install 'rnn-xp[io]'\n"
    )


def test_torch_device_index_is_checked_against_the_gpus(monkeypatch, capsys, work):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(_backends.BackendUnavailable, match=r"there is no 'cuda:1'"):
        _backends.for_run("torch", "cuda:1")
    before = snapshot(work)
    rc, _, err = call(run_args("--backend", "torch", "--device", "cuda:1"), capsys)
    assert rc == 2
    assert err == (
        "rnn-xp: error: --device: PyTorch sees 1 CUDA GPU(s), cuda:0 to cuda:0; "
        "there is no 'cuda:1'\n"
    )
    assert snapshot(work) == before


def fake_cupy(available: bool, count: int = 1) -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.__version__ = "13.9.9"
    cp.is_available = lambda: available
    runtime = types.SimpleNamespace(getDeviceCount=lambda: count)
    cp.cuda = types.SimpleNamespace(runtime=runtime)
    return cp


def test_cupy_device_index_is_checked_against_the_gpus(monkeypatch, capsys, work):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(True, count=1))
    with pytest.raises(_backends.BackendUnavailable, match=r"there is no GPU 1"):
        _backends.for_run("cupy", "1")
    with pytest.raises(_backends.BackendUnavailable, match=r"there is no GPU 3"):
        _backends.for_run("cupy", "cuda:3")
    with pytest.raises(_backends.BackendUnavailable, match=r"CuPy devices are GPU indices"):
        _backends.for_run("cupy", "-1")
    rc, _, err = call(run_args("--backend", "cupy", "--device", "1"), capsys)
    assert rc == 2
    assert err == ("rnn-xp: error: --device: CuPy sees 1 CUDA GPU(s), 0 to 0; there is no GPU 1\n")


def test_cupy_without_a_gpu_does_not_suggest_installing_it(monkeypatch, capsys, work):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(False))
    rc, _, err = call(run_args("--backend", "cupy"), capsys)
    assert rc == 2
    assert err.startswith("rnn-xp: error: --backend: CuPy 13.9.9 is installed but sees no CUDA")
    assert "pip install" not in err


# -- what the command line now does right ---------------------------------------------


def python_api(weights, xs, lengths=None):
    model = rnn_xp.load(weights)
    model.batch_first = True
    return model.eval().forward(xs, lengths=lengths, inference=True)


def test_no_sequences_give_empty_outputs(work, capsys):
    np.save("none.npy", np.zeros((0, 7, 4), np.float32))
    rc, _, err = call(run_args("--state-out", "s.npy", "--no-progress", input="none.npy"), capsys)
    assert rc == 0, err
    assert np.load("y.npy").shape == (0, 7, 10)
    assert np.load("s.npy").shape == (2, 4, 0, 5)
    assert not [p for p in os.listdir() if p.endswith(".partial") and os.path.isfile(p)]


def test_a_model_saved_with_dropout_runs_in_evaluation_mode(work, capsys):
    rc, _, err = call(run_args("--no-progress", weights="drop.npz"), capsys)
    assert rc == 0, err
    out, _ = python_api("drop.npz", X)
    np.testing.assert_array_equal(np.load("y.npy"), out)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32"])
def test_lengths_of_any_integer_dtype_run_on_torch(work, capsys, dtype):
    pytest.importorskip("torch")
    np.save("lu.npy", LENGTHS.astype(dtype))
    argv = run_args("--lengths", "lu.npy", "--backend", "torch", "--dtype", "float64")
    rc, _, err = call([*argv, "--no-progress"], capsys)
    assert rc == 0, err
    out, _ = python_api("w.npz", X.astype(np.float64), LENGTHS)
    np.testing.assert_allclose(np.load("y.npy"), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("input_dtype", "option", "want"),
    [
        ("float16", None, "float32"),  # result type of float16 and the float32 model
        ("float32", None, "float32"),
        ("float64", None, "float64"),  # as the Python API: float64 input computes in float64
        ("float64", "float32", "float32"),
        ("float32", "float16", "float16"),
    ],
)
def test_the_output_dtype_follows_the_python_api(work, capsys, input_dtype, option, want):
    xs = X.astype(input_dtype)
    np.save("xd.npy", xs)
    extra = [] if option is None else ["--dtype", option]
    rc, _, err = call(run_args(*extra, "--no-progress", input="xd.npy"), capsys)
    assert rc == 0, err
    y = np.load("y.npy")
    assert y.dtype == want
    # --dtype is the computation dtype: the model's parameters are cast to it.
    model = rnn_xp.load("w.npz").astype(want)
    model.batch_first = True
    out, _ = model.forward(xs.astype(want) if option else xs)
    assert out.dtype == want
    np.testing.assert_array_equal(y, out)


def test_a_failed_run_leaves_no_partial_file(work, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(batch, "_compute", boom)
    with pytest.raises(RuntimeError, match="fell over"):
        batch.run_file(batch.prepare("w.npz", "x.npy", "y.npy", state_out="s.npy"))
    assert not os.path.exists("y.npy.partial")
    assert not os.path.exists("s.npy.partial")
    assert not os.path.exists("y.npy")


def test_a_temporary_name_that_is_a_link_is_refused_and_its_target_kept(work, capsys):
    # A link planted under an output's temporary name would have the output
    # written through it, over the file it points to.
    (work / "precious.txt").write_text("precious\n")
    os.symlink("precious.txt", work / "y.npy.partial")
    os.symlink("precious.txt", work / "p.png.partial")
    before = snapshot(work)
    for argv, option in [
        (run_args("--no-progress"), "--out"),
        (["train", "--steps", "1", "--hidden-size", "4", "--plot", "p.png"], "--plot"),
    ]:
        rc, _, err = call(argv, capsys)
        assert rc == 2, err
        assert err.startswith(f"rnn-xp: error: {option}: its temporary file "), err
        assert "is not a regular file" in err
        assert snapshot(work) == before


def test_a_second_run_writing_the_same_output_is_refused(work, capsys):
    job = batch.prepare("w.npz", "x.npy", "y.npy")
    with batch._outputs(job):  # the first run holds the temporary file
        with pytest.raises(
            batch.BatchError, match=r"--out: another run is writing 'y\.npy\.partial' now"
        ):
            batch.run_file(batch.prepare("w.npz", "x.npy", "y.npy"))
        assert os.path.exists("y.npy.partial")  # the second run removed nothing
    assert os.path.exists("y.npy")
    rc, _, err = call(run_args("--no-progress"), capsys)  # a stale one is reused
    assert rc == 0, err


def test_a_temporary_name_that_is_a_hard_link_is_refused_and_its_file_kept(work, capsys):
    np.save("keep.npy", np.arange(10.0))
    os.link("keep.npy", "y.npy.partial")
    before = snapshot(work)
    rc, _, err = call(run_args("--no-progress"), capsys)
    assert rc == 2, err
    assert err == (
        "rnn-xp: error: --out: its temporary file 'y.npy.partial' is a hard link to another "
        "file; remove it\n"
    )
    assert snapshot(work) == before


def test_a_temporary_file_swapped_for_a_link_mid_run_is_not_written_through(work, monkeypatch):
    # The run writes through the file it created and locked, never by name,
    # and renames only that file.
    np.save("victim.npy", np.full((*X.shape[:2], 10), 7.0, np.float32))
    victim = (work / "victim.npy").read_bytes()
    real_compute = batch._compute

    def swap_then_compute(*args, **kwargs):
        if not os.path.islink("y.npy.partial"):
            os.replace("y.npy.partial", "moved.npy")
            os.symlink("victim.npy", "y.npy.partial")
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(batch, "_compute", swap_then_compute)
    job = batch.prepare("w.npz", "x.npy", "y.npy", batch_size=4)
    with pytest.raises(
        batch.BatchError,
        match=r"--out: its temporary file 'y\.npy\.partial' was replaced during the run; nothing was written to 'y\.npy'",
    ):
        batch.run_file(job)
    assert (work / "victim.npy").read_bytes() == victim
    assert os.path.islink("y.npy.partial")  # not ours: left alone
    assert not os.path.exists("y.npy")


def test_a_worker_writes_only_into_the_file_the_job_created(work):
    job = batch.prepare("w.npz", "x.npy", "y.npy")
    with batch._outputs(job) as made:
        job = dataclasses.replace(job, written=tuple((o, p.identity) for o, p in made.items()))
        os.replace("y.npy.partial", "moved.npy")
        with open("y.npy.partial", "wb") as f:
            np.save(f, np.zeros((10, 7, 10), np.float32))
        with pytest.raises(OSError, match="not the temporary file this job created"):
            batch._chunk_task(job, 0, 5)
        os.replace("moved.npy", "y.npy.partial")  # the job's own file back, to finish
    assert np.load("y.npy").shape == (10, 7, 10)


def test_a_disk_too_full_for_the_outputs_refuses_before_the_work(work, capsys, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    before = snapshot(work)
    rc, _, err = call(run_args("--no-progress"), capsys)
    assert rc == 2, err
    assert err == (
        "rnn-xp: error: --out: cannot create 'y.npy.partial' (No space left on device)\n"
    )
    assert snapshot(work) == before


def test_options_are_not_abbreviated(work, capsys):
    rc, _, err = call(run_args("--batch", "0"), capsys)
    assert rc == 2
    assert err == "rnn-xp: error: unrecognized arguments: --batch 0\n"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--out", "new.npy/", "--out: expected a file name, got 'new.npy/'"),
        ("--state-out", "s.npy/", "--state-out: expected a file name, got 's.npy/'"),
        ("--out", "b" * 250 + ".npy", "--out: the file name 'bbbb"),
        ("--state-out", "b" * 250 + ".npy", "--state-out: the file name 'bbbb"),
    ],
)
def test_output_names_the_file_system_refuses_are_checked_first(
    work, capsys, option, value, message
):
    before = snapshot(work)
    argv = run_args("--no-progress", "--state-out", "s.npy") if option == "--out" else run_args()
    rc, _, err = call([*argv, option, value], capsys)
    assert rc == 2, err
    assert err.startswith(f"rnn-xp: error: {message}"), err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(work) == before


def test_a_checkpoint_name_too_long_is_refused_before_training(work, capsys):
    before = snapshot(work)
    name = "c" * 250 + ".npz"
    rc, out, err = call(
        ["train", "--steps", "1", "--hidden-size", "4", "--checkpoint", name], capsys
    )
    assert rc == 2, err
    assert err.startswith("rnn-xp: error: --checkpoint: the file name 'cccc"), err
    assert not out.strip()
    assert snapshot(work) == before


# -- train: resume, report, restart ----------------------------------------------------


def train(capsys, *argv):
    rc, out, err = call(["train", "--hidden-size", "8", "--no-progress", *argv], capsys)
    assert rc == 0, err
    return out


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(work, capsys):
    straight = train(capsys, "--steps", "6", "--checkpoint", "a.npz")
    first = train(capsys, "--steps", "3", "--checkpoint", "b.npz")
    resumed = train(capsys, "--steps", "6", "--checkpoint", "b.npz")
    assert "resuming b.npz at step 3 of 6" in resumed
    a, b = np.load("a.npz"), np.load("b.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:  # parameters, readout, Adam's moments, states, every loss
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len(a["extra.train.losses"]) == 6
    report = {line.split()[0]: line for line in straight.splitlines() if line.startswith("  ")}
    again = {line.split()[0]: line for line in resumed.splitlines() if line.startswith("  ")}
    for key in ("training", "held-out", "comparison"):
        assert report[key] == again[key]
    assert "3 steps" in first


def test_the_log_interval_changes_no_checkpoint(work, capsys):
    every = train(capsys, "--steps", "3", "--checkpoint", "a.npz", "--log-every", "1")
    once = train(capsys, "--steps", "3", "--checkpoint", "b.npz", "--log-every", "2")
    a, b = np.load("a.npz"), np.load("b.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert every.splitlines()[1] == once.splitlines()[1]  # the training losses reported


def test_a_checkpoint_at_its_steps_only_reports(work, capsys):
    train(capsys, "--steps", "2", "--checkpoint", "c.npz")
    before = snapshot(work)
    out = train(capsys, "--steps", "1", "--checkpoint", "c.npz")
    assert "c.npz is already at step 2 (--steps 1): nothing to train" in out
    assert "held-out loss" in out
    assert snapshot(work) == before


def test_restart_overwrites_deliberately(work, capsys):
    out = train(capsys, "--steps", "1", "--checkpoint", "w.npz", "--restart")
    assert "resuming" not in out
    assert "train.settings" in rnn_xp.io.load_extra("w.npz")


def test_a_run_that_does_not_beat_the_baseline_exits_0_and_says_so(work, capsys):
    out = train(capsys, "--steps", "1", "--checkpoint", "c.npz")
    assert "comparison         the held-out loss does NOT beat the unigram baseline" in out


def test_the_loss_curve_is_written_whole(work, capsys):
    pytest.importorskip("matplotlib")
    train(capsys, "--steps", "1", "--checkpoint", "c.npz", "--plot", "loss.svg")
    with open("loss.svg") as f:
        assert f.read().lstrip().startswith("<?xml")
    assert not os.path.exists("loss.svg.partial")


# -- check names the backend it could not run -------------------------------------------


def test_check_skips_unavailable_backends_only_when_not_named(capsys, monkeypatch):
    from rnn_xp import check

    def missing():
        raise _backends.BackendUnavailable("Nothing is not installed")

    fake = {
        "numpy": check.BACKENDS["numpy"],
        "nothing": _backends.Backend("nothing", False, missing),
    }
    monkeypatch.setattr(check, "BACKENDS", fake)
    small = ["--size", "2", "3", "2", "2", "--repeat", "1"]
    rc, out, err = call(["check", *small], capsys)
    assert rc == 0
    assert "nothing                   skipped: Nothing is not installed" in out
    rc, out, err = call(["check", *small, "--backend", "numpy", "--backend", "nothing"], capsys)
    assert rc == 2
    assert out == ""
    assert err == "rnn-xp: error: --backend nothing: cannot run here: Nothing is not installed\n"


# -- help -------------------------------------------------------------------------------


def test_every_option_says_what_it_does_and_its_default():
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            text = action.help or ""
            assert text.endswith("."), (name, action.dest, text)
            assert "Default:" in text or "Required." in text, (name, action.dest, text)


@pytest.mark.parametrize(("argv", "options"), [(["check"], 4), (["bench"], 11)])
def test_check_and_bench_help(capsys, argv, options):
    rc, out, _ = call([*argv, "--help"], capsys)
    assert rc == 0
    assert out.startswith(f"usage: rnn-xp {argv[0]} ")
    assert "``" not in out
    assert out.count("Default:") == options
    if argv == ["check"]:
        assert "2 for a bad argument or a named backend that cannot run." in " ".join(out.split())


def test_top_level_help_is_plain_text(capsys):
    rc, out, _ = call(["--help"], capsys)
    assert rc == 0
    assert "``" not in out
    assert out.startswith("usage: rnn-xp ")


# -- end to end, through a subprocess ----------------------------------------------------


@pytest.mark.parametrize("out", ["x_link.npy", "x_hard.npy", "x.npy"])
def test_end_to_end_an_output_that_is_the_input_is_refused(work, out):
    before = snapshot(work)
    result = rnn_xp_cmd(
        "run", "--weights", "w.npz", "--input", "x.npy", "--out", out, cwd=work, check=False
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"rnn-xp: error: --out: {out!r} is the same file as --input 'x.npy'; {SAME}\n"
    )
    assert snapshot(work) == before
    np.testing.assert_array_equal(np.load(work / "x.npy"), X)


def test_end_to_end_the_program_is_rnn_xp_however_called(work):
    result = rnn_xp_cmd("check", "--repeat", "0", cwd=work, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "rnn-xp: error: --repeat: expected a positive integer, got 0"
    ]
    for command in ("check", "bench", "run"):
        usage = rnn_xp_cmd(command, "--help", cwd=work).stdout
        assert usage.startswith(f"usage: rnn-xp {command} "), usage


def test_no_sequences_need_no_task_on_a_cluster(work):
    pytest.importorskip("distributed")
    np.save("none.npy", np.zeros((0, 7, 4), np.float32))

    class NoTasks:
        def submit(self, *args, **kwargs):
            raise AssertionError("no chunk, no task")

    job = batch.prepare("w.npz", "none.npy", "y.npy", state_out="s.npy")
    batch.run_file_distributed(job, NoTasks())
    assert np.load("y.npy").shape == (0, 7, 10)
    assert np.load("s.npy").shape == (2, 4, 0, 5)


def test_a_terminated_run_removes_its_temporary_files(tmp_path):
    # SIGTERM, as a job scheduler stops a job, unwinds like Ctrl-C.
    rnn_xp.Recurrent("gru", 8, 64, batch_first=True, seed=0).save(tmp_path / "w.npz")
    np.save(tmp_path / "x.npy", np.zeros((4000, 50, 8), dtype=np.float32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNN_XP_")}
    argv = ["run", "--weights", "w.npz", "--input", "x.npy", "--out", "y.npy"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnn_xp", *argv, "--batch-size", "8", "--no-progress"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "y.npy.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    running = proc.poll() is None
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert running, "the run finished before it could be stopped"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not (tmp_path / "y.npy.partial").exists()
    assert not (tmp_path / "y.npy").exists()


# -- device arguments, refused before any file exists -----------------------------------


def _spy_on_outputs(monkeypatch) -> list[str]:
    """The temporary outputs `rnn-xp run` creates from now on, even if it removes them."""
    created: list[str] = []

    class Spy(batch._Partial):
        def __init__(self, option, path, *args):
            created.append(path)
            super().__init__(option, path, *args)

    monkeypatch.setattr(batch, "_Partial", Spy)
    return created


def _machine(monkeypatch, world: str | None) -> None:
    """Make this machine look like ``world``: one GPU for a library, or (skip) none."""
    if world == "cupy-one-gpu":
        monkeypatch.setitem(sys.modules, "cupy", fake_cupy(True, count=1))
    elif world == "torch-one-gpu":
        torch = pytest.importorskip("torch")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    else:
        _skip_unless(world)


DEVICE_REFUSALS = {
    "cupy-1-of-one-gpu": (
        ["cupy", "1"],
        "cupy-one-gpu",
        "--device: CuPy sees 1 CUDA GPU(s), 0 to 0; there is no GPU 1",
    ),
    "cupy-cuda:1-of-one-gpu": (
        ["cupy", "cuda:1"],
        "cupy-one-gpu",
        "--device: CuPy sees 1 CUDA GPU(s), 0 to 0; there is no GPU 1",
    ),
    "cupy-1-not-installed": (["cupy", "1"], "no-cupy", "--backend: CuPy is not installed"),
    "torch-cuda:1-of-one-gpu": (
        ["torch", "cuda:1"],
        "torch-one-gpu",
        "--device: PyTorch sees 1 CUDA GPU(s), cuda:0 to cuda:0; there is no 'cuda:1'",
    ),
    "torch-cuda:1-without-gpu": (["torch", "cuda:1"], "no-cuda", "--device: PyTorch "),
    "torch-cuda-without-gpu": (["torch", "cuda"], "no-cuda", "--device: PyTorch "),
    "jax-gpu-without-gpu": (["jax", "gpu"], "no-jax-gpu", "--device: JAX sees no gpu device"),
    "numpy-cuda": (["numpy", "cuda"], None, "--device: NumPy runs on the CPU only, not on 'cuda'"),
}


@pytest.mark.parametrize("command", ["run", "train"])
@pytest.mark.parametrize(
    ("device", "world", "message"), list(DEVICE_REFUSALS.values()), ids=list(DEVICE_REFUSALS)
)
def test_a_device_this_machine_lacks_is_one_line_before_any_file(
    work, capsys, monkeypatch, command, device, world, message
):
    _machine(monkeypatch, world)
    created = _spy_on_outputs(monkeypatch)
    options = ["--backend", device[0], "--device", device[1]]
    argv = (
        run_args(*options, "--no-progress")
        if command == "run"
        else [*TRAIN, *options, "--checkpoint", "n.npz"]
    )
    before = snapshot(work)
    rc, out, err = call(argv, capsys)
    assert (rc, out) == (2, ""), err
    assert err.startswith(f"rnn-xp: error: {message}"), err
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    if world == "no-cuda":
        assert f"so it cannot use {device[1]!r}" in err
    assert created == []  # not even for a moment
    assert snapshot(work) == before


BUSY = "CUDA error: all CUDA-capable devices are busy\nor unavailable"


def _busy(*args):
    raise RuntimeError(BUSY)


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_device_that_fails_when_first_used_is_one_line_before_any_file(
    work, capsys, monkeypatch, command
):
    # A GPU that exists but cannot be used (busy, out of memory, a broken
    # driver) fails with the library's RuntimeError.
    monkeypatch.setattr(batch, "for_run", _busy)
    created = _spy_on_outputs(monkeypatch)
    options = ["--backend", "torch", "--device", "cuda:0"]
    argv = run_args(*options) if command == "run" else [*TRAIN, *options, "--checkpoint", "n.npz"]
    _refused_as_busy(argv, work, capsys, created)


def _refused_as_busy(argv, work, capsys, created):
    """One line naming --device, exit 2, and no file created, even for a moment."""
    before = snapshot(work)
    rc, _, err = call(argv, capsys)
    assert rc == 2
    assert err == (
        "rnn-xp: error: --device: torch fails on 'cuda:0': CUDA error: all CUDA-capable "
        "devices are busy or unavailable\n"
    )
    assert created == []
    assert snapshot(work) == before


def test_a_device_that_fails_to_take_the_model_is_refused_before_any_file(
    work, capsys, monkeypatch
):
    # Found only when the model is put on the device: still before the outputs exist.
    numpy = _backends.for_run("numpy")
    monkeypatch.setattr(batch, "for_run", lambda name, device: numpy)
    monkeypatch.setattr(batch, "_model", _busy)
    created = _spy_on_outputs(monkeypatch)
    argv = run_args("--backend", "torch", "--device", "cuda:0", "--no-progress")
    _refused_as_busy(argv, work, capsys, created)


def test_a_read_error_mid_run_is_one_line_and_stops_the_reader(work, capsys, monkeypatch):
    import threading

    real = batch._staged_inputs

    def failing(job):
        fill, buffers, close = real(job)

        def fill_or_fail(host, start, stop):
            if start >= 4:
                raise OSError(errno.EIO, "Input/output error", job.input)
            fill(host, start, stop)

        return fill_or_fail, buffers, close

    monkeypatch.setattr(batch, "_staged_inputs", failing)
    created = _spy_on_outputs(monkeypatch)
    rc, out, err = call(run_args("--batch-size", "2", "--no-progress"), capsys)
    assert (rc, out) == (1, "")
    assert err == "rnn-xp: error: x.npy: Input/output error\n"
    assert created == ["y.npy"]
    assert not os.path.exists("y.npy.partial")
    assert not os.path.exists("y.npy")
    assert [t for t in threading.enumerate() if t.name == "rnn-xp reader"] == []


# -- the inputs change, or the backend fails, during the work -----------------------------


def _after_reading(monkeypatch, at: int, action) -> None:
    """``action(job)`` once the reader has read the chunk that starts at ``at``."""
    real = batch._staged_inputs

    def staged(job):
        fill, *rest = real(job)

        def fill_then_act(host, start, stop):
            fill(host, start, stop)
            if start == at:
                action(job)

        return (fill_then_act, *rest)

    monkeypatch.setattr(batch, "_staged_inputs", staged)


def _reader_gone() -> bool:
    import threading

    for thread in threading.enumerate():
        if thread.name == "rnn-xp reader":
            thread.join(10)
    return not [t for t in threading.enumerate() if t.name == "rnn-xp reader"]


TRUNCATE_AFTER_THE_FIRST_CHUNK = """
import os, sys
from rnn_xp import batch, cli

real = batch._staged_inputs

def staged(job):
    fill, *rest = real(job)

    def fill_then_truncate(host, start, stop):
        fill(host, start, stop)
        if start == 0:
            os.truncate(job.input, 300)

    return (fill_then_truncate, *rest)

batch._staged_inputs = staged
sys.exit(cli.main(sys.argv[1:]))
"""


def test_end_to_end_an_input_truncated_mid_run_is_one_line_not_a_crash(work):
    # Reading a memory-mapped file past its new end is SIGBUS: the process
    # died with no word and left its .partial file.
    np.save("big.npy", np.ones((64, 50, 4), np.float32))  # many pages
    argv = run_args("--batch-size", "8", "--no-progress", input="big.npy")
    proc = subprocess.run(
        [sys.executable, "-c", TRUNCATE_AFTER_THE_FIRST_CHUNK, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
    assert proc.stderr == (
        "rnn-xp: error: big.npy: changed during the run: truncated to 300 bytes; rows 8:16 "
        "lie past its end\n"
    )
    assert not os.path.exists("y.npy.partial")
    assert not os.path.exists("y.npy")


@pytest.mark.parametrize(
    ("option", "path", "size"), [("--input", "x.npy", 300), ("--lengths", "l.npy", 150)]
)
def test_an_input_truncated_mid_run_is_one_line(work, capsys, monkeypatch, option, path, size):
    _after_reading(monkeypatch, 0, lambda job: os.truncate(path, size))
    created = _spy_on_outputs(monkeypatch)
    argv = run_args("--lengths", "l.npy", "--state-out", "s.npy", "--batch-size", "2")
    rc, out, err = call([*argv, "--no-progress"], capsys)
    assert (rc, out) == (1, ""), err
    assert err == (
        f"rnn-xp: error: {path}: changed during the run: truncated to {size} bytes; rows 2:4 "
        "lie past its end\n"
    )
    assert created == ["y.npy", "s.npy"]
    assert [p for p in os.listdir() if p.startswith(("y.npy", "s.npy"))] == []
    assert _reader_gone()


def test_an_input_written_to_mid_run_is_one_line(work, capsys, monkeypatch):
    def overwrite(job):
        with open(job.input, "r+b") as f:  # the same size: only its time tells
            f.seek(200)
            f.write(b"\0" * 8)

    os.utime("x.npy", ns=(0, 0))  # a write now surely changes its modification time
    _after_reading(monkeypatch, 0, overwrite)
    rc, out, err = call(run_args("--batch-size", "2", "--no-progress"), capsys)
    assert (rc, out) == (1, ""), err
    assert err == (
        "rnn-xp: error: x.npy: changed during the run: written to (its size or modification "
        "time changed)\n"
    )
    assert [p for p in os.listdir() if p.startswith("y.npy")] == []


def test_an_input_changed_before_the_run_started_is_one_line(work, capsys, monkeypatch):
    job = batch.prepare("w.npz", "x.npy", "y.npy", batch_size=4)
    np.save("x.npy", X[:, :5])  # after the checks, before the run opens it
    with pytest.raises(batch.InputChanged) as info:
        batch.run_file(job)
    assert (info.value.filename, info.value.strerror) == (
        "x.npy",
        "changed since it was checked: now float32 of shape (10, 5, 4)",
    )
    assert not os.path.exists("y.npy.partial")  # never created


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_an_input_removed_or_replaced_by_name_mid_run_is_read_whole(
    work, capsys, monkeypatch, change
):
    # The run reads the file it opened; what the name points to later is another file.
    np.save("other.npy", np.zeros_like(X))
    action = {
        "removed": lambda job: os.remove(job.input),
        "replaced": lambda job: os.replace("other.npy", job.input),
    }[change]
    _after_reading(monkeypatch, 0, action)
    rc, _, err = call(run_args("--batch-size", "2", "--no-progress"), capsys)
    assert rc == 0, err
    y = np.load("y.npy")
    for start in range(0, 10, 2):
        np.testing.assert_array_equal(
            y[start : start + 2], python_api("w.npz", X[start : start + 2])[0]
        )


@pytest.mark.parametrize(
    ("order", "stored", "dtype"),
    [
        ("F", "<f4", None),  # the rows of a chunk are one run of bytes per column
        ("F", ">f8", "float32"),
        ("C", ">f4", None),  # through the scratch buffer, cast
        ("C", "<f8", "float32"),
        ("C", "<f4", "float64"),
    ],
)
def test_inputs_in_any_order_and_byte_order_run_as_the_python_api(
    work, capsys, order, stored, dtype
):
    xs = np.asarray(X, dtype=stored, order=order)
    np.save("xo.npy", xs)
    np.save("lo.npy", np.asfortranarray(LENGTHS.astype(">u2")))
    with open("xo.npy", "rb") as f:
        assert (b"'fortran_order': True" in f.read(128)) == (order == "F")
    argv = run_args("--lengths", "lo.npy", "--batch-size", "3", "--no-progress", input="xo.npy")
    rc, _, err = call([*argv, *(["--dtype", dtype] if dtype else [])], capsys)
    assert rc == 0, err
    y = np.load("y.npy")
    model = rnn_xp.load("w.npz").eval()
    want = dtype or np.result_type(xs.dtype, np.float32).name
    model = model.astype(want)
    model.batch_first = True
    for start in range(0, 10, 3):
        rows = slice(start, start + 3)
        out, _ = model.forward(xs[rows].astype(want), lengths=LENGTHS[rows], inference=True)
        np.testing.assert_array_equal(y[rows], out)


def test_a_reader_scratch_buffer_counts_in_the_chunk_memory(work, capsys, monkeypatch):
    # Read as it is, a C-order float32 chunk needs 18.5 KB here; in Fortran order
    # it goes through a scratch buffer too (another 1.1 KB).
    np.save("xf.npy", np.asfortranarray(X))
    monkeypatch.setattr(batch, "physical_memory", lambda: 19_000)
    rc, _, err = call(run_args("--no-progress"), capsys)
    assert rc == 0, err
    rc, _, err = call(run_args("--no-progress", input="xf.npy"), capsys)
    assert rc == 2
    assert err.startswith(
        "rnn-xp: error: --batch-size: a chunk of 10 sequences of T=7 needs about 19.6 KB"
    ), err


OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB\n(GPU 0; 79.3 GiB total)"


@pytest.mark.parametrize("where", ["compute", "reader"])
def test_a_backend_error_mid_run_is_one_line(work, capsys, monkeypatch, where):
    # torch.OutOfMemoryError, JAX's JaxRuntimeError, a CUDA error surfacing in
    # the reader's copy: all RuntimeError.
    if where == "compute":
        real = batch._compute

        def compute(job, start, *args):
            if start >= 4:
                raise RuntimeError(OUT_OF_MEMORY)
            return real(job, start, *args)

        monkeypatch.setattr(batch, "_compute", compute)
    else:

        def fail(job):
            raise RuntimeError(OUT_OF_MEMORY)

        _after_reading(monkeypatch, 4, fail)
    created = _spy_on_outputs(monkeypatch)
    rc, out, err = call(run_args("--batch-size", "2", "--no-progress"), capsys)
    assert (rc, out) == (1, ""), err
    assert err == (
        "rnn-xp: error: numpy failed during the run: CUDA out of memory. Tried to allocate "
        "2.00 GiB (GPU 0; 79.3 GiB total); a smaller --batch-size needs less memory\n"
    )
    assert created == ["y.npy"]
    assert not os.path.exists("y.npy.partial")
    assert _reader_gone()


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(128 + signal.SIGTERM)])
def test_an_interrupt_mid_run_is_not_taken_for_an_error(work, capsys, monkeypatch, stop):
    def compute(*args):
        raise stop

    monkeypatch.setattr(batch, "_compute", compute)
    if isinstance(stop, SystemExit):
        with pytest.raises(SystemExit) as info:
            cli.main(run_args("--no-progress"))
        assert info.value.code == 128 + signal.SIGTERM
    else:
        rc, _, err = call(run_args("--no-progress"), capsys)
        assert (rc, err) == (130, "rnn-xp: interrupted\n")
    assert not os.path.exists("y.npy.partial")


def test_an_interrupt_does_not_wait_for_a_hung_read(work, capsys, monkeypatch):
    import threading

    hung, resume = threading.Event(), threading.Event()

    def hang(job):
        hung.set()
        resume.wait(30)  # a network file system that stopped answering

    _after_reading(monkeypatch, 4, hang)
    real = batch._compute

    def compute(job, start, *args):
        if start == 2:
            assert hung.wait(10)
            raise KeyboardInterrupt  # Ctrl-C; SIGTERM unwinds the same way
        return real(job, start, *args)

    monkeypatch.setattr(batch, "_compute", compute)
    try:
        started = time.monotonic()
        rc, _, err = call(run_args("--batch-size", "2", "--no-progress"), capsys)
        elapsed = time.monotonic() - started
    finally:
        resume.set()
    assert (rc, err) == (130, "rnn-xp: interrupted\n")
    assert elapsed < 10
    assert not os.path.exists("y.npy.partial")
    assert _reader_gone()


def test_no_more_than_two_copies_of_the_input_live_on_the_backend(work, monkeypatch):
    # What `_check_chunk_memory` counts: the chunk computing and the one read ahead.
    import threading
    import weakref

    from rnn_xp import _transfer

    live: set[int] = set()
    peak, lock = [0], threading.Lock()
    real_copy = _transfer.Transfer.copy

    def copy(self, dst, src, after):
        arrays, event = real_copy(self, dst, src, after)
        with lock:
            live.add(id(arrays[0]))
            peak[0] = max(peak[0], len(live))
        weakref.finalize(arrays[0], live.discard, id(arrays[0]))
        return arrays, event

    real_write = batch._write

    def slow_write(*args):  # a slow disk: the reader stages the next chunks meanwhile
        time.sleep(0.02)
        real_write(*args)

    monkeypatch.setattr(_transfer.Transfer, "copy", copy)
    monkeypatch.setattr(batch, "_write", slow_write)
    batch.run_file(batch.prepare("w.npz", "x.npy", "y.npy", batch_size=1))
    assert peak[0] == 2
