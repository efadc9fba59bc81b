"""Dask: Dask arrays as input, and the batch job on a real multi-process cluster."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import rnn_xp
from rnn_xp import batch
from tests.support import two_states

da = pytest.importorskip("dask.array")


# -- Dask arrays as input ------------------------------------------------------------


@pytest.mark.parametrize("mode", list(rnn_xp.MODES))
def test_dask_input_runs_per_batch_chunk_and_stays_lazy(mode):
    rng = np.random.default_rng(0)
    model = rnn_xp.Recurrent(
        mode, 4, 5, 2, bidirectional=True, batch_first=True, seed=0, dtype="float64"
    )
    xs = rng.standard_normal((12, 9, 4))
    lengths = rng.integers(1, 10, 12)
    # Time chunked too: it is rechunked, the batch axis is not.
    lazy_xs = da.from_array(xs, chunks=((5, 5, 2), 3, 4))
    out, h_n = model.forward(lazy_xs, lengths=da.from_array(lengths, chunks=4), inference=True)
    h_n = h_n[0] if two_states(mode) else h_n

    assert isinstance(out, da.Array)
    assert out.chunks[0] == (5, 5, 2)
    assert h_n.chunks[1] == (5, 5, 2)
    # One task per batch chunk runs the model: the graph does not grow with T or layers.
    assert len(dict(out.__dask_graph__())) < 60
    want_out, want_h = model.forward(xs, lengths=lengths, inference=True)
    want_h = want_h[0] if two_states(mode) else want_h
    np.testing.assert_array_equal(out.compute(), want_out)
    np.testing.assert_array_equal(h_n.compute(), want_h)


def test_dask_input_to_layers_with_numpy_weights():
    rng = np.random.default_rng(1)
    Wx, Wh, b = rng.standard_normal((4, 20)) / 2, rng.standard_normal((5, 20)) / 3, np.zeros(20)
    xs = rng.standard_normal((8, 6, 4))
    lazy = da.from_array(xs, chunks=(3, 6, 4))
    hs, _, _, cache = rnn_xp.lstm_forward(lazy, Wx, Wh, b, inference=True)
    assert cache is None
    assert hs.chunks[0] == (3, 3, 2)
    np.testing.assert_allclose(hs.compute(), rnn_xp.lstm_forward(xs, Wx, Wh, b)[0], rtol=1e-12)
    hs, _ = rnn_xp.rnn_forward(lazy, Wx[:, :5], Wh[:, :5], b[:5])
    np.testing.assert_allclose(
        hs.compute(), rnn_xp.rnn_forward(xs, Wx[:, :5], Wh[:, :5], b[:5])[0], rtol=1e-12
    )


def test_dask_input_refuses_weights_of_a_third_library():
    strict = pytest.importorskip("array_api_strict")
    lazy = da.zeros((4, 3, 2), chunks=2)
    with pytest.raises(TypeError, match=r"Wh: expected an array of the same library as xs"):
        rnn_xp.rnn_forward(
            lazy, np.zeros((2, 3)), strict.zeros((3, 3), dtype=strict.float64), np.zeros(3)
        )


# -- the batch job on a cluster --------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c,
        distributed.Client(c) as client,
    ):
        yield c, client


@pytest.fixture
def job_files(tmp_path):
    rng = np.random.default_rng(2)
    rnn_xp.Recurrent("gru", 6, 16, 2, bidirectional=True, seed=0).save(tmp_path / "w.npz")
    np.save(tmp_path / "x.npy", rng.standard_normal((600, 20, 6)).astype(np.float32))
    np.save(tmp_path / "l.npy", rng.integers(1, 21, 600))
    return tmp_path


def make_job(tmp, out, **kw):
    return batch.prepare(
        str(tmp / "w.npz"),
        str(tmp / "x.npy"),
        str(tmp / out),
        lengths=str(tmp / "l.npy"),
        state_out=str(tmp / f"s-{out}"),
        **kw,
    )


def test_cluster_run_equals_the_single_process_run(cluster, job_files):
    _, client = cluster
    tmp = job_files
    batch.run_file(make_job(tmp, "local.npy", batch_size=600))
    batch.run_file_distributed(make_job(tmp, "cluster.npy", batch_size=50), client)
    np.testing.assert_array_equal(np.load(tmp / "cluster.npy"), np.load(tmp / "local.npy"))
    np.testing.assert_array_equal(np.load(tmp / "s-cluster.npy"), np.load(tmp / "s-local.npy"))


def test_job_survives_a_killed_worker(cluster, job_files):
    _, client = cluster
    tmp = job_files
    batch.run_file(make_job(tmp, "local.npy", batch_size=600))
    job = make_job(tmp, "survivor.npy", batch_size=5)  # 120 tasks
    done, errors = [], []

    def progress(n):
        done.append(n)

    thread = threading.Thread(
        target=lambda: _catch(errors, batch.run_file_distributed, job, client, progress)
    )
    thread.start()
    deadline = time.monotonic() + 120
    while len(done) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = client.run(os.getpid)  # worker address -> the worker process's pid
    victim = next(iter(pids.values()))
    done_at_kill = sum(done)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)

    assert done_at_kill < 600, "the job finished before a worker could be killed"
    assert not errors, errors
    assert sum(done) == 600
    assert not (tmp / "survivor.npy.partial").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # the worker really died
    np.testing.assert_array_equal(np.load(tmp / "survivor.npy"), np.load(tmp / "local.npy"))
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next test


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        errors.append(exc)


def test_cli_runs_on_a_local_cluster(job_files):
    from tests.test_cli import run_job

    tmp = job_files
    batch.run_file(make_job(tmp, "local.npy", batch_size=600))
    run_job(
        "w.npz",
        "x.npy",
        "y.npy",
        "--lengths",
        "l.npy",
        "--batch-size",
        "100",
        "--workers",
        "2",
        "--no-progress",
        cwd=tmp,
    )
    np.testing.assert_array_equal(np.load(tmp / "y.npy"), np.load(tmp / "local.npy"))
