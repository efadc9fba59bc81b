"""The hand-off of batch chunks to the device (`rnn_xp._transfer`), tested on the CPU.

`Staging` is generic over the primitives of a `Transfer`. Here it runs over
`FakeGpu`, which behaves like a GPU's streams: a copy lands in its device buffer
only later, when a "copy engine" thread gets to it, and a "kernel" reads its
input later too, on a "compute stream" thread. A hand-off that reads a chunk
before its copy, refills a host buffer its copy still reads, or copies into a
device buffer a kernel still reads, then sees wrong numbers; `FakeGpu` also
checks each rule directly and records every breach.

The CuPy and torch-CUDA primitives need a GPU and are not run here; only their
selection is.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import random
import threading
import time
import types

import numpy as np
import pytest

import rnn_xp
from rnn_xp import _backends, _transfer, batch
from rnn_xp._transfer import Staging, Transfer

D = 3
NUMPY = _backends.for_run("numpy")


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def expected(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk rows start:stop of the two inputs: every value tells its row."""
    rows = np.arange(start, stop)
    x = rows[:, None, None] * 10.0 + np.arange(2 * D).reshape(1, 2, D) / 10
    return x, rows + 1


class FakeGpu(Transfer):
    """A `Transfer` whose copies and kernels run later, in order, each on a thread of its own."""

    asynchronous = True

    def __init__(
        self,
        seed: int = 0,
        copy_delay: float = 0.002,
        compute_delay: float = 0.002,
        host_waits: bool = False,
    ):
        super().__init__(loaded=None)
        self._host_waits = host_waits
        self._rng = random.Random(seed)
        self._delays = (copy_delay, compute_delay)
        self._lock = threading.Lock()
        self.reading: collections.Counter[int] = collections.Counter()  # host buffer: copies
        self.busy: collections.Counter[int] = collections.Counter()  # device buffer: kernels
        self.writing: collections.Counter[int] = collections.Counter()  # device buffer: copies
        self.waited: set[int] = set()
        self.breaches: list[str] = []
        self.copies_made = 0
        self.afters: list = []
        self._copy_stream: queue.SimpleQueue = queue.SimpleQueue()
        self._compute_stream: queue.SimpleQueue = queue.SimpleQueue()
        self._engines = [
            threading.Thread(target=self._run, args=(q,), daemon=True)
            for q in (self._copy_stream, self._compute_stream)
        ]
        for engine in self._engines:
            engine.start()

    def _breach(self, what: str) -> None:
        with self._lock:
            self.breaches.append(what)

    def _overlap(self, arrays, mine: collections.Counter, theirs: collections.Counter, step):
        """Count ``arrays`` in or out of ``mine``; a breach if ``theirs`` holds one of them."""
        with self._lock:
            if any(theirs[_address(a)] for a in arrays):
                self.breaches.append("a copy and a kernel used one device buffer at once")
            for a in arrays:
                mine[_address(a)] += step

    def _run(self, stream: queue.SimpleQueue) -> None:
        while (work := stream.get()) is not None:
            work()

    def _sleep(self, which: int) -> None:
        time.sleep(self._rng.uniform(0, self._delays[which]))

    # -- the primitives
    def host_empty(self, shape, dtype):
        return np.full(shape, -1, dtype)

    def device_empty(self, shape, dtype):
        return np.full(shape, -1, dtype)

    def copy(self, dst, src, after):
        done = threading.Event()
        with self._lock:
            self.copies_made += 1
            self.afters.append(after)
            for s in src:
                self.reading[_address(s)] += 1

        def work():
            if after is not None:
                after.wait()  # the copy stream waits for the consumer's event
            self._overlap(dst, self.writing, self.busy, +1)
            self._sleep(0)  # the copy takes time
            for d, s in zip(dst, src, strict=True):
                np.copyto(d, s)
            self._overlap(dst, self.writing, self.busy, -1)
            with self._lock:
                for s in src:
                    self.reading[_address(s)] -= 1
            done.set()

        self._copy_stream.put(work)
        return dst, done

    def wait(self, event):
        with self._lock:
            self.waited.add(id(event))
        if self._host_waits:  # for a consumer that computes on the host (a NumPy model)
            event.wait()
        else:  # as on a GPU: the kernels queued next wait, the host does not
            self._compute_stream.put(event.wait)

    def synchronize(self, event):
        if event is not None:
            event.wait()

    def record(self):
        done = threading.Event()
        self._compute_stream.put(done.set)
        return done

    def to_numpy(self, a):
        return np.array(a)

    # -- for the tests
    def kernel(self, arrays, want) -> None:
        """An asynchronous kernel reading ``arrays``, which must hold ``want`` all along."""

        def work():
            self._overlap(arrays, self.busy, self.writing, +1)
            for a, w in zip(arrays, want, strict=True):
                if not np.array_equal(a, w):
                    self._breach("a kernel read a chunk that was not (or no longer) its own")
            self._sleep(1)
            for a, w in zip(arrays, want, strict=True):
                if not np.array_equal(a, w):
                    self._breach("a chunk changed under its kernel")
            self._overlap(arrays, self.busy, self.writing, -1)

        self._compute_stream.put(work)

    def finish(self) -> None:
        for stream in (self._copy_stream, self._compute_stream):
            stream.put(None)
        for engine in self._engines:
            engine.join()

    def in_flight(self) -> int:
        with self._lock:
            return sum(self.reading.values())


def chunks_of(N: int, B: int) -> list[tuple[int, int]]:
    return [(s, min(s + B, N)) for s in range(0, N, B)]


def make_fill(gpu: FakeGpu | None = None, fail_at: int | None = None, calls: list | None = None):
    def fill(host, start, stop):
        if calls is not None:
            calls.append(start)
        if start == fail_at:
            raise OSError(5, "Input/output error", "x.npy")
        if gpu is not None and gpu.reading[_address(host[0])]:
            gpu._breach("a host buffer was refilled before its copy finished")
        for h, e in zip(host, expected(start, stop), strict=True):
            h[...] = e

    return fill


def buffers(B: int):
    return [((B, 2, D), np.float64), ((B,), np.int64)]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rnn-xp reader"]


def in_time(fn, timeout: float = 20.0):
    """``fn()`` in a thread; its result, or a failure if it has not returned by ``timeout``."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "stuck"
    return result[0] if result else None


# -- the hand-off over asynchronous copies and kernels ----------------------------------


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize(
    ("N", "B", "delays"),
    [
        (10, 4, (0.002, 0.002)),  # a last chunk of 2
        (9, 3, (0.01, 0.0)),  # slow copies
        (9, 3, (0.0, 0.01)),  # slow kernels
        (1, 4, (0.002, 0.002)),  # one chunk, shorter than a slot
        (12, 1, (0.001, 0.001)),
    ],
)
def test_chunks_arrive_in_order_and_whole_over_asynchronous_copies(slots, N, B, delays):
    gpu = FakeGpu(seed=N * B + slots, copy_delay=delays[0], compute_delay=delays[1])
    seen = []
    try:
        with Staging(gpu, make_fill(gpu), chunks_of(N, B), buffers(B), slots=slots) as staged:
            for chunk in staged:
                assert id(chunk.ready) in gpu.waited  # no kernel reads it before its copy
                want = expected(chunk.start, chunk.stop)
                assert [a.shape for a in chunk.arrays] == [w.shape for w in want]
                gpu.kernel(chunk.arrays, want)  # still running when the next chunk is asked for
                seen.append((chunk.start, chunk.stop))
        assert gpu.in_flight() == 0  # no copy outlives the staging buffers
    finally:
        gpu.finish()
    assert seen == chunks_of(N, B)
    assert gpu.breaches == []
    assert gpu.copies_made == len(seen)
    # Every copy into a device buffer waits for the compute before it, even the first.
    assert all(after is not None for after in gpu.afters)


def test_early_release_lets_the_reader_refill_while_the_kernel_runs():
    gpu = FakeGpu(seed=1, copy_delay=0.005, compute_delay=0.01)
    try:
        with Staging(gpu, make_fill(gpu), chunks_of(20, 2), buffers(2)) as staged:
            for chunk in staged:
                gpu.kernel(chunk.arrays, expected(chunk.start, chunk.stop))
                chunk.release()  # before the kernel is done: the next copy must wait for it
                chunk.release()  # twice is harmless
    finally:
        gpu.finish()
    assert gpu.breaches == []


class ManualEvents(Transfer):
    """Copies that complete only when the test says; waits that do not block (as on a GPU)."""

    asynchronous = True

    def __init__(self):
        super().__init__(loaded=None)
        self.events: list[threading.Event] = []
        self._lock = threading.Lock()
        self._all_done = False

    def copy(self, dst, src, after):
        with self._lock:
            self.events.append(threading.Event())
            if self._all_done:
                self.events[-1].set()
            return tuple(np.array(s) for s in src), self.events[-1]

    def complete_all(self) -> None:
        """Every copy done, now and from now on (leaving `Staging` waits for them)."""
        with self._lock:
            self._all_done = True
            for event in self.events:
                event.set()

    def synchronize(self, event):
        if event is not None:
            event.wait()


def test_a_slot_is_refilled_only_after_its_copy_completed():
    transfer, calls = ManualEvents(), []
    with Staging(transfer, make_fill(calls=calls), chunks_of(6, 2), buffers(2), slots=1) as staged:
        try:
            chunks = iter(staged)
            first = next(chunks)
            first.release()  # the consumer is done, but the copy out of the slot is not
            time.sleep(0.2)
            assert calls == [0]
            transfer.events[0].set()
            second = next(chunks)
            assert (second.start, calls) == (2, [0, 2])
            transfer.events[1].set()
            assert next(chunks).start == 4
        finally:
            transfer.complete_all()


def test_without_chunks_nothing_is_read():
    calls = []
    with Staging(FakeGpu(), make_fill(calls=calls), [], buffers(4)) as staged:
        assert list(staged) == []
    assert calls == []


def test_the_buffers_are_allocated_before_the_reader_starts():
    staging = Staging(Transfer(NUMPY), make_fill(), chunks_of(4, 2), buffers(2))
    assert reader_threads() == []
    assert [h.shape for h in staging._slots[0].host] == [(2, 2, D), (2,)]
    staging.close()  # never started: nothing to join


# -- failures: one error, in the consumer, and no thread left ---------------------------


def test_a_read_error_reaches_the_consumer_as_itself():
    gpu, seen = FakeGpu(), []
    try:
        staging = Staging(gpu, make_fill(gpu, fail_at=4), chunks_of(10, 2), buffers(2))
        with pytest.raises(OSError, match="Input/output error") as info, staging:  # noqa: PT012
            for chunk in staging:
                seen.append(chunk.start)
        assert gpu.in_flight() == 0
    finally:
        gpu.finish()
    assert seen == [0, 2]  # every chunk before the failure, in order
    assert info.value.filename == "x.npy"
    assert reader_threads() == []


class FailingCopy(Transfer):
    def copy(self, dst, src, after):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_copy_error_reaches_the_consumer():
    staging = Staging(FailingCopy(NUMPY), make_fill(), chunks_of(4, 2), buffers(2))
    with pytest.raises(RuntimeError, match="illegal memory access"), staging:
        list(staging)
    assert reader_threads() == []


@pytest.mark.parametrize("error", [ValueError("the model fell over"), KeyboardInterrupt()])
def test_a_consumer_error_stops_the_reader_waiting_for_a_slot(error):
    gpu = FakeGpu(copy_delay=0.02)

    def consume():
        staging = Staging(gpu, make_fill(gpu), chunks_of(100, 1), buffers(1))
        with pytest.raises(type(error)), staging:  # noqa: PT012
            for _ in staging:
                time.sleep(0.05)  # the reader fills every slot and waits for one
                raise error
        return gpu.in_flight()

    try:
        assert in_time(consume) == 0  # the copies in flight were waited for
    finally:
        gpu.finish()
    assert reader_threads() == []


def test_leaving_waits_for_the_copies_in_flight():
    class SlowCopies(FakeGpu):
        def _sleep(self, which):
            time.sleep(0.2 if which == 0 else 0)

    gpu = SlowCopies()
    staging = Staging(gpu, make_fill(gpu), chunks_of(10, 2), buffers(2))
    try:
        with pytest.raises(ValueError, match="stop"), staging:  # noqa: PT012
            for _ in staging:  # the copy of the second chunk has just started
                raise ValueError("stop")
        assert gpu.in_flight() == 0
    finally:
        gpu.finish()


def test_a_consumer_that_stops_early_leaves_no_reader():
    with Staging(Transfer(NUMPY), make_fill(), chunks_of(50, 1), buffers(1)) as staged:
        for chunk in staged:
            if chunk.start == 3:
                break
    assert reader_threads() == []


def test_a_cleanup_error_does_not_hide_the_first():
    class BrokenSync(Transfer):
        def copy(self, dst, src, after):
            return tuple(np.array(s) for s in src), "an event"

        def synchronize(self, event):
            if event is not None:
                raise RuntimeError("the device is gone")

    staging = Staging(BrokenSync(NUMPY), make_fill(), chunks_of(4, 2), buffers(2))
    with pytest.raises(ValueError, match="first"), staging:  # noqa: PT012
        for _ in staging:
            raise ValueError("first")


def test_a_released_chunk_holds_its_arrays_no_more():
    # Its copy on the backend is freed once the caller drops its own references,
    # before the reader stages the chunk after next into the released slot.
    with Staging(Transfer(NUMPY), make_fill(), chunks_of(4, 2), buffers(2)) as staged:
        for chunk in staged:
            assert len(chunk.arrays) == 2
            chunk.release()
            assert chunk.arrays == ()


class HungRead:
    """A ``fill`` whose read of the chunk at ``at`` hangs until `resume` (a network file
    system that stopped answering); ``closed`` counts the calls of `close`."""

    def __init__(self, at: int) -> None:
        self.at, self.closed = at, 0
        self.hung, self._resume = threading.Event(), threading.Event()
        self._fill = make_fill()

    def __call__(self, host, start, stop):
        if start == self.at:
            self.hung.set()
            assert self._resume.wait(30), "never resumed"
        self._fill(host, start, stop)

    def resume(self) -> None:
        self._resume.set()

    def close(self) -> None:
        self.closed += 1


def _consume_until_hung(staging: Staging, read: HungRead) -> None:
    with pytest.raises(KeyboardInterrupt), staging:  # noqa: PT012
        for _ in staging:
            assert read.hung.wait(10)
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM's SystemExit


def test_a_failing_consumer_leaves_a_hung_read_behind_on_the_cpu():
    read = HungRead(at=2)
    staging = Staging(
        Transfer(NUMPY), read, chunks_of(6, 2), buffers(2), close_source=read.close,
        stop_timeout=0.05,
    )  # fmt: skip
    try:
        started = time.monotonic()
        in_time(lambda: _consume_until_hung(staging, read), timeout=10)
        assert time.monotonic() - started < 5
        assert read.closed == 0  # the reader still holds its file
        assert [t.is_alive() for t in reader_threads()] == [True]
    finally:
        read.resume()
    staging._thread.join(10)  # it ends as soon as its read returns, and closes its file
    assert reader_threads() == []
    assert read.closed == 1


def test_an_asynchronous_transfer_waits_for_a_hung_read_before_freeing_its_buffers():
    # Once its read returns, the reader starts a copy into a device buffer:
    # leaving earlier could free that buffer under the copy.
    gpu, read = FakeGpu(), HungRead(at=2)
    staging = Staging(
        gpu, read, chunks_of(6, 2), buffers(2), close_source=read.close, stop_timeout=0.05
    )
    timer = threading.Timer(0.5, read.resume)
    try:
        timer.start()
        started = time.monotonic()
        in_time(lambda: _consume_until_hung(staging, read), timeout=20)
        assert time.monotonic() - started >= 0.4
        assert reader_threads() == []
        assert gpu.in_flight() == 0  # the copy started after the read was waited for too
        assert read.closed == 1
    finally:
        timer.cancel()
        read.resume()
        gpu.finish()


@pytest.mark.parametrize("how", ["every chunk read", "consumer fails", "never started"])
def test_the_source_is_closed_once_when_the_reader_is_done_with_it(how):
    closed = []
    staging = Staging(
        Transfer(NUMPY), make_fill(), chunks_of(6, 2), buffers(2),
        close_source=lambda: closed.append(threading.current_thread().name),
    )  # fmt: skip
    if how == "never started":
        staging.close()
        assert closed == [threading.current_thread().name]
        return
    with contextlib.suppress(ValueError), staging:
        for chunk in staging:
            if how == "consumer fails" and chunk.start == 2:
                raise ValueError("the model fell over")
    staging.close()  # twice is harmless
    assert closed == ["rnn-xp reader"]


# -- which primitives a backend gets ------------------------------------------------------


def loaded(xp, device):
    return types.SimpleNamespace(name="fake", xp=xp, device=device)


def test_gpu_primitives_are_chosen_for_cuda_only():
    torch = pytest.importorskip("torch")
    import array_api_compat.numpy as np_xp
    import array_api_compat.torch as torch_xp

    assert _transfer.transfer_class(loaded(np_xp, "cpu")) is Transfer
    assert _transfer.transfer_class(loaded(torch_xp, torch.device("cpu"))) is Transfer
    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    assert _transfer.transfer_class(loaded(torch_xp, cuda)) is _transfer.TorchCudaTransfer
    cupy = types.ModuleType("cupy")
    assert _transfer.transfer_class(loaded(cupy, None)) is _transfer.CupyTransfer


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_cpu_backends_get_the_synchronous_primitives(name):
    try:
        backend = _backends.for_run(name)
    except _backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    transfer = _transfer.transfer_for(backend)
    assert type(transfer) is Transfer
    arrays, event = transfer.copy(None, (np.arange(3.0),), None)
    assert event is None
    np.testing.assert_array_equal(transfer.to_numpy(arrays[0]), np.arange(3.0))


# -- the batch run over the asynchronous fake ----------------------------------------------


@pytest.mark.parametrize("batch_size", [3, 4, 10, 64])
def test_a_batch_run_over_asynchronous_copies_equals_the_python_api(
    tmp_path, monkeypatch, batch_size
):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((10, 6, 4)).astype(np.float32)
    lengths = rng.integers(1, 7, size=10).astype(np.uint8)
    model = rnn_xp.Recurrent("gru", 4, 5, 2, bidirectional=True, batch_first=True, seed=3)
    model.save(tmp_path / "w.npz")
    np.save(tmp_path / "x.npy", xs)
    np.save(tmp_path / "l.npy", lengths)
    gpus = []

    def fake_gpu(backend):
        gpus.append(FakeGpu(seed=batch_size, copy_delay=0.005, host_waits=True))
        return gpus[-1]

    monkeypatch.setattr(_transfer, "transfer_for", fake_gpu)
    job = batch.prepare(
        tmp_path / "w.npz",
        tmp_path / "x.npy",
        tmp_path / "y.npy",
        batch_size=batch_size,
        lengths=tmp_path / "l.npy",
        state_out=tmp_path / "s.npy",
    )
    try:
        batch.run_file(job)
    finally:
        for gpu in gpus:
            gpu.finish()
    assert [gpu.breaches for gpu in gpus] == [[]]
    # Chunk by chunk, as the run computes (a BLAS may round a batch of 1 differently).
    model.eval()
    for start, stop in chunks_of(10, batch_size):
        n = lengths[start:stop].astype(np.int64)
        want, h_n = model.forward(xs[start:stop], lengths=n, inference=True)
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy")[start:stop], want)
        np.testing.assert_array_equal(np.load(tmp_path / "s.npy")[:, start:stop], h_n)
    assert reader_threads() == []
