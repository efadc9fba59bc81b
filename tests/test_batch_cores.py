"""`rnn-xp run` on every core: chunks computed at once in threads (``--jobs``).

The threaded run must write the very bytes the one-chunk-at-a-time run writes
(outputs and final states), keep the progress bar, and fail as that run fails:
one clear error, no ``.partial`` file and no output that looks complete.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import rnn_xp
from rnn_xp import batch, cli
from rnn_xp._backends import for_run
from tests.support import call

# Big enough for several threads (10 chunks) and for a multi-threaded BLAS in the
# one-chunk run (the second layer's input projection is 1024 x 64 x 128 at H=32),
# so that the comparison also shows that BLAS's thread count changes no bit.
N, T, D, H, B = 640, 16, 6, 32, 64
MODES = ["rnn_tanh", "lstm", "gru"]


def _files(d, mode: str) -> None:
    rng = np.random.default_rng(7)
    model = rnn_xp.Recurrent(mode, D, H, 2, bidirectional=True, batch_first=True, seed=3)
    model.save(d / f"{mode}.npz")
    np.save(d / "x.npy", rng.standard_normal((N, T, D)).astype(np.float32))
    np.save(d / "l.npy", rng.integers(1, T + 1, size=N).astype(np.uint16))


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for mode in MODES:
        _files(tmp_path, mode)
    return tmp_path


def run_args(*extra, weights="lstm.npz", out="y.npy"):
    return ["run", "--weights", weights, "--input", "x.npy", "--out", out, *extra]


def _leftovers() -> list[str]:
    return sorted(p for p in os.listdir() if p.startswith(("y", "s")))


def _chunk_threads_gone() -> bool:
    for thread in threading.enumerate():
        if thread.name == "rnn-xp chunks":
            thread.join(10)
    return not [t for t in threading.enumerate() if t.name == "rnn-xp chunks"]


def _backend(name: str) -> None:
    if name == "torch":
        pytest.importorskip("torch")


# -- the same bytes -------------------------------------------------------------------


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("lengths", [None, "l.npy"], ids=["full", "lengths"])
@pytest.mark.parametrize("mode", MODES)
def test_threads_write_the_bytes_of_one_chunk_at_a_time(work, mode, lengths, library):
    _backend(library)

    def run(jobs: int, tag: str) -> tuple[bytes, bytes]:
        job = batch.prepare(
            f"{mode}.npz",
            "x.npy",
            f"y{tag}.npy",
            batch_size=B,
            lengths=lengths,
            state_out=f"s{tag}.npy",
            backend=library,
            jobs=jobs,
        )
        assert job.jobs == jobs
        batch.run_file(job)
        return (work / f"y{tag}.npy").read_bytes(), (work / f"s{tag}.npy").read_bytes()

    one = run(1, "1")
    for jobs in (2, 3, 4):  # 10 chunks: the last round of threads is short
        assert run(jobs, str(jobs)) == one
    # and what the Python API gives, chunk by chunk, on the same library
    loaded = for_run(library)
    model = rnn_xp.load(f"{mode}.npz", like=loaded.asarray(np.zeros(1, np.float32)))
    model.batch_first = True
    xs, n = np.load("x.npy"), np.load("l.npy").astype(np.int64)
    y = np.load("y4.npy")
    for start in range(0, N, B):
        rows = slice(start, start + B)
        lengths_rows = None if lengths is None else loaded.asarray(n[rows])
        want, _ = model.forward(loaded.asarray(xs[rows]), lengths=lengths_rows, inference=True)
        np.testing.assert_array_equal(y[rows], loaded.to_numpy(want))


def test_the_bytes_do_not_depend_on_jobs_where_blas_threads_change_bits(tmp_path):
    # OpenBLAS 0.3.31 rounds a product with K = 500 differently on one thread and
    # on several (its threaded driver blocks K otherwise); a run of several
    # chunks therefore holds BLAS to one thread whatever --jobs.
    rnn_xp.Recurrent("lstm", 500, 16, 2, bidirectional=True, batch_first=True, seed=3).save(
        tmp_path / "w.npz"
    )
    x = np.random.default_rng(1).standard_normal((5 * B, 16, 500)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    written = []
    for jobs in (1, 2, 5):
        y = tmp_path / f"y{jobs}.npy"
        batch.run_file(
            batch.prepare(tmp_path / "w.npz", tmp_path / "x.npy", y, batch_size=B, jobs=jobs)
        )
        written.append(y.read_bytes())
    assert written[1:] == written[:1] * 2


def blas_threads() -> set[int]:
    from threadpoolctl import threadpool_info

    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.mark.parametrize(("jobs", "batch_size"), [(1, B), (2, B), (2, N)])
def test_blas_holds_to_one_thread_during_a_run_of_several_chunks(
    work, monkeypatch, jobs, batch_size
):
    before = blas_threads()
    seen: list[set[int]] = []
    real = batch._compute

    def compute(*args):
        seen.append(blas_threads())
        return real(*args)

    monkeypatch.setattr(batch, "_compute", compute)
    job = batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=batch_size, jobs=jobs)
    batch.run_file(job)
    several = batch_size < N
    assert seen == [{1} if several else before] * (N // batch_size)
    assert blas_threads() == before  # restored


@pytest.mark.parametrize("jobs", [1, 3])
def test_torch_holds_to_one_thread_during_a_run_of_several_chunks(work, monkeypatch, jobs):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    seen: list[int] = []
    real = batch._compute

    def compute(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(batch, "_compute", compute)
    job = batch.prepare("gru.npz", "x.npy", "y.npy", batch_size=B, backend="torch", jobs=jobs)
    batch.run_file(job)
    assert seen == [1] * (N // B)
    assert torch.get_num_threads() == before


def test_jobs_chunks_compute_at_once_with_a_one_thread_blas(work, monkeypatch):
    before = blas_threads()
    jobs = 3
    together = threading.Barrier(jobs, timeout=20)  # breaks unless 3 chunks compute at once
    seen: list[tuple[str, set[int]]] = []
    real = batch._compute

    def compute(job, start, *args):
        if start < jobs * B:
            together.wait()
        seen.append((threading.current_thread().name, blas_threads()))
        return real(job, start, *args)

    monkeypatch.setattr(batch, "_compute", compute)
    batch.run_file(batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, jobs=jobs))
    assert len(seen) == N // B
    assert {name for name, _ in seen} == {"rnn-xp chunks"}
    assert {n for _, threads in seen for n in threads} <= {1}
    assert blas_threads() == before  # restored
    assert _chunk_threads_gone()


def test_the_command_defaults_to_every_core_and_the_library_to_one(work, monkeypatch):
    monkeypatch.setattr(batch, "available_cores", lambda: 4)
    assert batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B).jobs == 1
    assert batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, jobs=None).jobs == 4
    # never more threads than chunks
    assert batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=256, jobs=None).jobs == 3
    assert batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=256, jobs=8).jobs == 3
    jobs = []
    monkeypatch.setattr(batch, "run_file", lambda job, progress: jobs.append(job.jobs))
    cli.main([str(a) for a in run_args("--batch-size", B, "--no-progress")])
    cli.main([str(a) for a in run_args("--batch-size", B, "--no-progress", "--jobs", "2")])
    assert jobs == [4, 2]


def test_jobs_that_would_not_fit_in_memory(work, monkeypatch):
    monkeypatch.setattr(batch, "available_cores", lambda: 4)
    one = batch._chunk_memory(B, T, D, 4 * H, 2 * H, 4, 0, 1)
    two = batch._chunk_memory(B, T, D, 4 * H, 2 * H, 4, 0, 2)
    three = batch._chunk_memory(B, T, D, 4 * H, 2 * H, 4, 0, 3)
    assert one < two < three
    monkeypatch.setattr(batch, "physical_memory", lambda: three - 1)
    # by default: as many as fit
    assert batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, jobs=None).jobs == 2
    # asked for: refused, naming --jobs, before any file
    with pytest.raises(batch.BatchError) as info:
        batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, jobs=3)
    assert str(info.value).startswith(
        f"--jobs: 3 chunks of {B} sequences of T={T} at once need about "
    )
    assert str(info.value).endswith("give a smaller --jobs or --batch-size")
    # not even one chunk fits: --batch-size, as before
    monkeypatch.setattr(batch, "physical_memory", lambda: one - 1)
    for jobs in (None, 1, 3):
        with pytest.raises(batch.BatchError, match=f"^--batch-size: a chunk of {B} sequences"):
            batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, jobs=jobs)
    assert _leftovers() == []


# -- the command: options, progress, errors ------------------------------------------------


def test_the_command_writes_the_same_bytes_and_shows_progress(work, capsys):
    argv = run_args("--batch-size", B, "--lengths", "l.npy", "--state-out", "s1.npy", out="y1.npy")
    rc, out, err = call([*argv, "--jobs", "1", "--no-progress"], capsys)
    assert (rc, out, err) == (0, "", "")
    argv = run_args("--batch-size", B, "--lengths", "l.npy", "--state-out", "s3.npy", out="y3.npy")
    rc, out, err = call([*argv, "--jobs", "3"], capsys)
    assert (rc, out) == (0, "")
    assert f"{N}/{N}" in err  # the bar counts every sequence
    assert "Traceback" not in err
    for a, b in [("y1.npy", "y3.npy"), ("s1.npy", "s3.npy")]:
        assert (work / a).read_bytes() == (work / b).read_bytes()
    assert _leftovers() == ["s1.npy", "s3.npy", "y1.npy", "y3.npy"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--jobs: expected a positive integer, got 0"),
        ("-2", "--jobs: expected a positive integer, got -2"),
        ("many", "--jobs: expected a positive integer, got 'many'"),
        ("", "--jobs: expected a positive integer, got ''"),
    ],
)
def test_a_bad_jobs_is_one_line_before_any_file(work, capsys, value, message):
    rc, out, err = call(run_args("--jobs", value), capsys)
    assert (rc, out) == (2, "")
    assert err == f"rnn-xp: error: {message}\n"
    assert _leftovers() == []


@pytest.mark.parametrize("jobs", [0, -1, 1.5, "2", True])
def test_prepare_refuses_a_bad_jobs(work, jobs):
    with pytest.raises(batch.BatchError, match=r"^--jobs: expected a positive integer, got "):
        batch.prepare("lstm.npz", "x.npy", "y.npy", jobs=jobs)


def test_jobs_on_a_backend_without_threads_is_refused(work, capsys):
    pytest.importorskip("jax")
    rc, out, err = call(run_args("--backend", "jax", "--jobs", "2"), capsys)
    assert (rc, out) == (2, "")
    assert err == (
        "rnn-xp: error: --jobs: only --backend numpy, and torch on the CPU, compute chunks in "
        "threads; expected 1 for --backend jax, got 2\n"
    )
    assert _leftovers() == []
    # the default takes one thread there, and --jobs 1 is fine
    job = batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, backend="jax", jobs=None)
    assert job.jobs == 1
    rc, _, err = call(run_args("--backend", "jax", "--jobs", "1", "--no-progress"), capsys)
    assert rc == 0, err


def test_jobs_with_a_dask_cluster_is_refused(work, capsys):
    pytest.importorskip("distributed")
    rc, out, err = call(run_args("--workers", "2", "--jobs", "2"), capsys)
    assert (rc, out) == (2, "")
    assert err == (
        "rnn-xp: error: --jobs: applies to a run in this process; with --workers each worker "
        "computes one chunk at a time\n"
    )
    assert _leftovers() == []


OUT_OF_MEMORY = "out of memory\nwhile allocating 2.0 GiB"


@pytest.mark.parametrize("failing", [[4 * B], [2 * B, 3 * B, 4 * B]], ids=["one", "several"])
def test_a_chunk_that_fails_is_one_error_and_leaves_no_output(work, capsys, monkeypatch, failing):
    real = batch._compute

    def compute(job, start, *args):
        if start in failing:
            raise RuntimeError(OUT_OF_MEMORY)
        return real(job, start, *args)

    monkeypatch.setattr(batch, "_compute", compute)
    argv = run_args("--batch-size", B, "--state-out", "s.npy", "--jobs", "3", "--no-progress")
    rc, out, err = call(argv, capsys)
    assert (rc, out) == (1, "")
    assert err == (
        "rnn-xp: error: numpy failed during the run: out of memory while allocating 2.0 GiB; "
        "a smaller --batch-size needs less memory\n"
    )
    assert _leftovers() == []  # no .partial file, and no y.npy or s.npy
    assert _chunk_threads_gone()


def test_a_read_error_in_one_thread_is_one_line(work, capsys, monkeypatch):
    import errno

    real = batch._staged_inputs

    def failing(job):
        fill, buffers, close = real(job)

        def fill_or_fail(host, start, stop):
            if start == 5 * B:
                raise OSError(errno.EIO, "Input/output error", job.input)
            fill(host, start, stop)

        return fill_or_fail, buffers, close

    monkeypatch.setattr(batch, "_staged_inputs", failing)
    rc, out, err = call(run_args("--batch-size", B, "--jobs", "3", "--no-progress"), capsys)
    assert (rc, out, err) == (1, "", "rnn-xp: error: x.npy: Input/output error\n")
    assert _leftovers() == []
    assert _chunk_threads_gone()


def test_an_input_truncated_mid_run_is_refused_in_threads(work, capsys, monkeypatch):
    real = batch._staged_inputs

    def staged(job):
        fill, *rest = real(job)

        def fill_then_truncate(host, start, stop):
            fill(host, start, stop)
            if start == B:
                os.truncate(job.input, 300)

        return (fill_then_truncate, *rest)

    monkeypatch.setattr(batch, "_staged_inputs", staged)
    rc, out, err = call(run_args("--batch-size", B, "--jobs", "3", "--no-progress"), capsys)
    assert (rc, out) == (1, "")
    assert err == (
        f"rnn-xp: error: x.npy: changed during the run: truncated to 300 bytes; rows "
        f"{2 * B}:{3 * B} lie past its end\n"
    )
    assert _leftovers() == []


def test_an_interrupt_in_threads_does_not_wait_for_a_hung_read(work, capsys, monkeypatch):
    hung, resume = threading.Event(), threading.Event()
    real_staged, real_compute = batch._staged_inputs, batch._compute

    def staged(job):
        fill, *rest = real_staged(job)

        def fill_or_hang(host, start, stop):
            if start == 2 * B:
                hung.set()
                resume.wait(30)  # a network file system that stopped answering
            fill(host, start, stop)

        return (fill_or_hang, *rest)

    def compute(job, start, *args):
        if start == B:
            assert hung.wait(10)
            raise KeyboardInterrupt  # Ctrl-C; SIGTERM unwinds the same way
        return real_compute(job, start, *args)

    monkeypatch.setattr(batch, "_staged_inputs", staged)
    monkeypatch.setattr(batch, "_compute", compute)
    try:
        started = time.monotonic()
        rc, _, err = call(run_args("--batch-size", B, "--jobs", "3", "--no-progress"), capsys)
        elapsed = time.monotonic() - started
    finally:
        resume.set()
    assert (rc, err) == (130, "rnn-xp: interrupted\n")
    assert elapsed < 10
    assert _leftovers() == []
    assert _chunk_threads_gone()


def test_a_slow_start_of_the_threads_does_not_wait_for_a_hung_read(work, capsys, monkeypatch):
    """The main thread starts the last thread only once another hangs in a read (holding the
    read lock): starting it must not wait for that lock (it once did, for 30 s)."""
    hung, resume = threading.Event(), threading.Event()
    real_staged, real_compute, real_start = (
        batch._staged_inputs,
        batch._compute,
        threading.Thread.start,
    )
    started = []

    def staged(job):
        fill, *rest = real_staged(job)

        def fill_or_hang(host, start, stop):
            if start == B:
                hung.set()
                resume.wait(30)
            fill(host, start, stop)

        return (fill_or_hang, *rest)

    def compute(job, start, *args):
        if start == 0:
            assert hung.wait(10)
            raise KeyboardInterrupt
        return real_compute(job, start, *args)

    def start(thread):
        if thread.name == "rnn-xp chunks":
            started.append(thread)
            if len(started) == 3:  # a main thread slower than its workers
                assert hung.wait(10)
        real_start(thread)

    monkeypatch.setattr(batch, "_staged_inputs", staged)
    monkeypatch.setattr(batch, "_compute", compute)
    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        began = time.monotonic()
        rc, _, err = call(run_args("--batch-size", B, "--jobs", "3", "--no-progress"), capsys)
        elapsed = time.monotonic() - began
    finally:
        resume.set()
    assert (rc, err) == (130, "rnn-xp: interrupted\n")
    assert elapsed < 10
    assert _leftovers() == []


def test_the_input_files_are_closed_once_the_threads_end(work, monkeypatch):
    closed = []
    real = batch._staged_inputs

    def staged(job):
        fill, buffers, close = real(job)

        def close_and_count():
            closed.append(threading.current_thread().name)
            close()

        return fill, buffers, close_and_count

    monkeypatch.setattr(batch, "_staged_inputs", staged)
    batch.run_file(batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, jobs=3))
    assert closed == ["rnn-xp chunks"]  # by the last thread to end
    # A run refused before its threads start closes them too.
    closed.clear()
    job = batch.prepare("lstm.npz", "x.npy", "y.npy", batch_size=B, jobs=3)
    with batch._outputs(job), pytest.raises(batch.BatchError, match="another run is writing"):
        batch.run_file(job)
    assert closed == ["MainThread"]
