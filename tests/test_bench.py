"""The benchmark suite runs, in a tiny configuration, so that it cannot rot.

Nothing here asserts a timing: speed is reported by ``python -m rnn_xp bench``
(see BENCHMARKS.md), never tested.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnn_xp import bench, cli


def test_bench_smoke_prints_every_table(capsys):
    assert cli.main(["bench", "--smoke", "--memory"]) == 0
    out = capsys.readouterr().out
    for kind in bench.KINDS:
        assert f"{kind}  N=3 T=4 D=5 H=6  float32" in out
        assert f"{kind:<9} inference" in out
    for contender in ("limit", "rnn_xp numpy", "notebook"):
        assert contender in out


@pytest.mark.parametrize("kind", list(bench.KINDS))
def test_bench_contenders_compute_the_same_forward(kind):
    """The timed rnn_xp calls are real forwards: NumPy, torch and JAX agree."""
    a = bench.problem(kind, 3, 4, 5, 6, "float64")
    ref = np.asarray(bench._forward_backward(kind, a, backward=False))
    torch = pytest.importorskip("torch")
    t = {k: torch.asarray(v) for k, v in a.items()}
    np.testing.assert_allclose(bench._forward_backward(kind, t, False).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("peer", ["flax_linen", "keras_jax", "rnn_xp_jax_autodiff"])
def test_the_jax_peers_compute_rnn_xp_s_forward_and_gradient(kind, peer, monkeypatch):
    """Flax and Keras run the problem's weights: the same function, and so the same work.

    Their gradient, like ``jax.grad`` through rnn_xp's forward, is rnn_xp's analytic one.
    """
    jax = pytest.importorskip("jax")
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # what `bench.keras_jax` asks for
    pytest.importorskip({"flax_linen": "flax", "keras_jax": "keras"}.get(peer, "jax"))
    a = bench.problem(kind, 3, 4, 5, 6, "float32")
    fns = getattr(bench, peer)(kind, a)
    label = {"flax_linen": "flax", "keras_jax": "keras jax"}.get(peer, "rnn_xp jax autodiff")
    want = np.asarray(bench._forward_backward(kind, a, backward=False))
    if (label, False) in fns:
        np.testing.assert_allclose(np.asarray(fns[label, False]()), want, rtol=1e-5, atol=1e-6)
    grads = jax.tree_util.tree_leaves(fns[label, True]())
    dxs = bench._forward_backward(kind, a, backward=True)[0]
    # The gradient with respect to xs is the one array of its shape among them all.
    (got,) = [g for g in grads if g.shape == a["xs"].shape]
    np.testing.assert_allclose(np.asarray(got), np.asarray(dxs), rtol=1e-4, atol=1e-5)


def test_the_jax_peers_step_aside_in_float64(capsys, monkeypatch):
    """Flax's and Keras' cells are float32 ones: a float64 table notes them, and runs."""
    pytest.importorskip("jax")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    pytest.importorskip("flax")
    assert cli.main(["bench", "--smoke", "--kind", "gru", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "note: flax_linen: skipped (flax is timed in float32 only, not float64)" in out


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed"])
def test_bench_adds_the_rows_of_a_mixed_precision_policy(capsys, policy):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    assert cli.main(["bench", "--smoke", "--kind", "lstm", "--precision", policy]) == 0
    out = capsys.readouterr().out
    fmt = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}[policy]
    for row in (f"rnn_xp torch {policy}", f"rnn_xp jax {policy}"):
        assert f"  {row:<30}fwd " in out
        assert f"  {row:<30}fwd+bwd " in out
    if policy == "bf16-mixed":
        assert f"  {'torch.nn autocast ' + fmt:<30}fwd+bwd " in out
    else:  # oneDNN's CPU LSTM has no float16 autocast: a note says so
        assert "note: torch_nn_autocast: skipped (torch.nn under float16 autocast on cpu" in out


def test_the_mixed_rows_time_real_mixed_forwards():
    """What the timed calls run: the model under the policy (bfloat16 out), not float32."""
    torch = pytest.importorskip("torch")
    a = bench.problem("lstm", 3, 4, 5, 6, "float32")
    model = bench._model("lstm", a, torch.zeros(1))
    out, _ = model.forward(torch.asarray(a["xs"]), precision="bf16-mixed")
    assert out.dtype == torch.bfloat16
    fns = bench.rnn_xp_torch_mixed("lstm", a, "bf16-mixed")
    assert set(fns) == {("rnn_xp torch bf16-mixed", False), ("rnn_xp torch bf16-mixed", True)}


def test_flop_count():
    # Elman forward: (N*T) x D x H input GEMM plus T recurrent (N x H x H) GEMMs, 2 FLOPs each.
    assert bench.flops("rnn_tanh", 2, 3, 4, 5, backward=False) == 2 * 2 * 3 * 5 * (4 + 5)
    assert bench.flops("lstm", 2, 3, 4, 5, backward=True) == 3 * 2 * 2 * 3 * 20 * (4 + 5)


def test_elman_floor_script_smoke():
    """benchmarks/elman_floor.py runs and prints every part (no timing asserted)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "elman_floor.py"
    run = subprocess.run(
        [sys.executable, str(script), "3", "4", "5", "6", "--rounds", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    for label in ("limit", "rnn_xp numpy", "notebook", "T x tanh", "floor"):
        assert f"{label} " in run.stdout, run.stdout


def test_best_of_settles_before_each_turn(monkeypatch):
    """With ``settle_s`` each turn sleeps, then makes one untimed call before the timed one."""
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("sleep", s)))

    def slow():
        events.append("call")

    # min_time_s=0: one timed call per turn
    bench.best_of({"a": slow}, rounds=3, budget_s=60.0, min_time_s=0.0, settle_s=0.25)
    turns = events[2:]  # after the two calls that count the calls per timing
    assert turns == [("sleep", 0.25), "call", "call"] * 3
    events.clear()
    bench.best_of({"a": slow}, rounds=3, budget_s=60.0, min_time_s=0.0)
    assert events == ["call"] * (2 + 3)
