"""The rnn-xp command, end to end through a subprocess, on real files in tmp_path."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import rnn_xp


def rnn_xp_cmd(*args, cwd=None, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNN_XP_")}
    result = subprocess.run(
        [sys.executable, "-m", "rnn_xp", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_job(weights, inputs, out, *options, cwd=None, check=True):
    """``rnn-xp run --weights W --input X --out Y`` with further options."""
    return rnn_xp_cmd(
        "run",
        "--weights",
        weights,
        "--input",
        inputs,
        "--out",
        out,
        *options,
        cwd=cwd,
        check=check,
    )


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((10, 7, 4)).astype(np.float32)
    lengths = np.array([7, 3, 5, 1, 2, 7, 7, 6, 4, 2])
    np.save(tmp_path / "x.npy", xs)
    np.save(tmp_path / "l.npy", lengths)
    rnn_xp_cmd(
        "init",
        "--mode",
        "lstm",
        "--input-size",
        4,
        "--hidden-size",
        5,
        "--num-layers",
        2,
        "--bidirectional",
        "--seed",
        1,
        "--out",
        tmp_path / "w.npz",
    )
    return tmp_path, xs, lengths


def python_api(weights, xs, lengths=None):
    model = rnn_xp.load(weights)
    model.batch_first = True
    return model.forward(xs, lengths=lengths)


def test_init_then_run_equals_the_python_api(files):
    tmp, xs, lengths = files
    run_job(
        tmp / "w.npz",
        tmp / "x.npy",
        tmp / "y.npy",
        "--lengths",
        tmp / "l.npy",
        "--state-out",
        tmp / "s.npy",
    )
    out, (h_n, c_n) = python_api(tmp / "w.npz", xs, lengths)
    np.testing.assert_array_equal(np.load(tmp / "y.npy"), out)
    np.testing.assert_array_equal(np.load(tmp / "s.npy"), np.stack([h_n, c_n]))


@pytest.mark.parametrize("batch_size", [1, 3, 10, 64])
def test_chunked_run_equals_one_chunk(files, batch_size):
    tmp, _, _ = files
    run_job(
        tmp / "w.npz",
        tmp / "x.npy",
        tmp / "chunked.npy",
        "--batch-size",
        batch_size,
        "--no-progress",
    )
    run_job(
        tmp / "w.npz",
        tmp / "x.npy",
        tmp / "whole.npy",
        "--batch-size",
        10,
        "--no-progress",
    )
    np.testing.assert_allclose(
        np.load(tmp / "chunked.npy"), np.load(tmp / "whole.npy"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_run_on_another_backend_agrees(files, library):
    pytest.importorskip(library)
    tmp, xs, lengths = files
    run_job(
        tmp / "w.npz",
        tmp / "x.npy",
        tmp / "y.npy",
        "--lengths",
        tmp / "l.npy",
        "--backend",
        library,
        "--dtype",
        "float64",
        "--no-progress",
    )
    out, _ = python_api(tmp / "w.npz", xs.astype(np.float64), lengths)
    y = np.load(tmp / "y.npy")
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, out, rtol=1e-5, atol=1e-6)


def test_convert_a_real_torch_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.GRU(4, 6, num_layers=2, bidirectional=True)
    torch.save(module.state_dict(), tmp_path / "m.pt")
    for suffix in (".npz", ".safetensors"):
        result = rnn_xp_cmd("convert", tmp_path / "m.pt", tmp_path / f"w{suffix}")
        assert "gru, D=4, H=6, 2 layer(s), bidirectional" in result.stdout
        xs = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32)
        got = rnn_xp.load(tmp_path / f"w{suffix}").forward(xs)[0]
        want = module(torch.asarray(xs))[0].detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# torch warns that its float32 CPU forward with projections does without oneDNN.
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_convert_an_lstm_with_projections(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2)
    torch.save(module.state_dict(), tmp_path / "m.pt")
    for suffix in (".npz", ".safetensors"):
        if suffix == ".safetensors" and importlib.util.find_spec("safetensors") is None:
            continue
        result = rnn_xp_cmd("convert", tmp_path / "m.pt", tmp_path / f"w{suffix}")
        assert "lstm, D=4, H=6, 2 layer(s), bidirectional" in result.stdout
        model = rnn_xp.load(tmp_path / f"w{suffix}")
        assert model.proj_size == 2
        xs = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32)
        got, (h, c) = model.forward(xs)
        want, (h_t, c_t) = module(torch.asarray(xs))
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h, h_t.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, c_t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_convert_asks_for_the_mode_of_a_plain_rnn(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.RNN(4, 6).state_dict(), tmp_path / "m.pt")
    result = rnn_xp_cmd("convert", tmp_path / "m.pt", tmp_path / "w.npz", check=False)
    assert result.returncode == 2
    assert "give --mode rnn_tanh or --mode rnn_relu" in result.stderr
    rnn_xp_cmd("convert", tmp_path / "m.pt", tmp_path / "w.npz", "--mode", "rnn_relu")
    assert rnn_xp.load(tmp_path / "w.npz").mode == "rnn_relu"


def test_an_interrupted_run_leaves_no_complete_looking_output(tmp_path):
    rnn_xp_cmd(
        "init",
        "--mode",
        "gru",
        "--input-size",
        8,
        "--hidden-size",
        64,
        "--out",
        tmp_path / "w.npz",
    )
    np.save(tmp_path / "x.npy", np.zeros((4000, 50, 8), dtype=np.float32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNN_XP_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rnn_xp",
            "run",
            "--weights",
            tmp_path / "w.npz",
            "--input",
            tmp_path / "x.npy",
            "--out",
            tmp_path / "y.npy",
            "--batch-size",
            "8",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "y.npy.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be interrupted"
    assert (tmp_path / "y.npy.partial").exists()
    assert not (tmp_path / "y.npy").exists()


def test_short_training_run_beats_the_unigram_baseline(tmp_path):
    pytest.importorskip("matplotlib")
    result = rnn_xp_cmd(
        "train",
        "--steps",
        300,
        "--checkpoint",
        tmp_path / "c.npz",
        "--plot",
        tmp_path / "loss.png",
        "--no-progress",
        cwd=tmp_path,
    )
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    first, last = map(float, lines["training"].split()[2:5:2])
    held_out = float(lines["held-out"].split()[2])
    unigram = float(lines["unigram"].split()[2])
    assert last < first
    assert held_out < 0.8 * unigram
    assert (tmp_path / "loss.png").stat().st_size > 1000
    model = rnn_xp.load(tmp_path / "c.npz")
    extra = rnn_xp.io.load_extra(tmp_path / "c.npz")
    assert model.mode == "lstm"
    # The readout and vocabulary, and (since resumable checkpoints) the training state.
    assert {"readout.W", "readout.b", "vocab"} <= set(extra)
    assert {k for k in extra if not k.startswith("train.")} == {"readout.W", "readout.b", "vocab"}
    assert "comparison         the held-out loss beats the unigram baseline" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "missing.npy"], "--input: no such file 'missing.npy'"),
        (["--weights", "missing.npz"], "weights: no such file 'missing.npz'"),
        (
            ["--input", "text.npy"],
            "--input: expected real floating values (float16, float32 or float64), got <U1",
        ),
        (["--input", "x5.npy"], "--input: expected shape (N, T, D=4) for --weights 'w.npz'"),
        (
            ["--backend", "tensorflow"],
            "--backend: expected one of numpy, torch, jax, cupy, got 'tensorflow'",
        ),
        (["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    ],
)
def test_bad_input_gets_one_line_and_a_nonzero_exit(files, args, message):
    tmp, _, _ = files
    np.save(tmp / "text.npy", np.array(["a", "b"]))
    np.save(tmp / "x5.npy", np.zeros((2, 3, 5), dtype=np.float32))
    base = {"--weights": "w.npz", "--input": "x.npy", "--out": "y.npy"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = rnn_xp_cmd("run", *[x for kv in base.items() for x in kv], cwd=tmp, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"rnn-xp: error: {message}"] or (
        len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp / "y.npy").exists()


def test_a_backend_that_is_not_installed_names_its_extra(files):
    tmp, _, _ = files
    try:
        import cupy  # noqa: F401

        pytest.skip("cupy is installed here")
    except ImportError:
        pass
    result = run_job(
        "w.npz",
        "x.npy",
        "y.npy",
        "--backend",
        "cupy",
        cwd=tmp,
        check=False,
    )
    assert result.returncode == 2
    assert "CuPy is not installed" in result.stderr
    assert "pip install 'rnn-xp[cuda12]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
