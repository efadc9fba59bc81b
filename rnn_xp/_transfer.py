"""Moving the chunks of a batch run to the device while the previous chunk computes.

A batch run (`rnn_xp.batch.run_file`) reads its input chunk by chunk. `Staging`
reads the next chunks in a second thread and starts their copies to the
device, so that reading the file, the host-to-device copy and the compute of
the current chunk can overlap (not yet measured on a GPU). It is generic: it is
written against the few primitives of a `Transfer`, and `transfer_for` picks
the primitives of the backend.

* `Transfer` itself is the synchronous one, for every backend without streams
  (NumPy, torch on the CPU, JAX, ...): a "copy" is ``Loaded.asarray``, done when
  it returns, and every event is None (already complete).
* `CupyTransfer` and `TorchCudaTransfer` stage each chunk in pinned host memory,
  copy it on a stream of their own, created non-blocking (it must not wait for,
  nor be waited by, the default stream: that would serialise the copy behind
  the compute, and with per-thread default streams nothing would order them),
  and hand the chunk over with an event that the compute stream waits on.

This module asks which library a backend is, as `_backends` does: the streams
and pinned memory it needs are not part of the array API.

The hand-off, with ``slots`` (2) staging slots, each a host buffer per array of
a chunk and, on a GPU, a device buffer per array:

1. The reader takes a free slot (the consumer has released it), waits (on the
   host) for the slot's previous copy to have finished reading its host
   buffer, and fills the host buffer from the file.
2. It starts the copy into the slot's device buffer, ordered after the
   compute that last read that buffer (the event the consumer recorded when
   it released the slot; for a new buffer, the compute queued before it was
   allocated), and records an event on the copy stream.
3. The consumer makes its compute wait for that event (on the device: the host
   does not block), computes, reads the results back, and releases the slot
   with an event marking the end of its use of the buffers.

A failure in the reader is raised in the consumer, as the very exception, when
the consumer asks for the chunk that failed; leaving `Staging` (normally or by
an exception) stops the reader, joins it, and waits for the copies still in
flight before the buffers can be freed. Leaving by an exception waits for the
reader only a moment (``stop_timeout``) where that is safe: with the synchronous
`Transfer` a reader stuck in a hung read is left behind (a daemon thread,
holding its own references to the host buffers it fills), so that Ctrl-C or
SIGTERM ends the process; with a GPU transfer the reader, once its read
returned, would start a copy into device memory that may have been freed, so
it is always joined.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import is_cupy_namespace, is_torch_namespace

__all__ = [
    "Chunk",
    "CupyTransfer",
    "Staging",
    "TorchCudaTransfer",
    "Transfer",
    "transfer_class",
    "transfer_for",
]

Event = Any
"""A point on a stream (a CUDA event), or None where everything is already done."""


class Transfer:
    """How chunks reach the backend and results come back: the synchronous primitives.

    A copy is ``loaded.asarray`` (a fresh array on the backend, done when it
    returns), so every event is None and waiting is a no-op. Subclasses with
    streams override every method but `host_empty` perhaps, and set
    `asynchronous`.

    Parameters
    ----------
    loaded : rnn_xp._backends.Loaded
        The backend.
    """

    asynchronous = False
    """Whether copies write into `device_empty` buffers after `copy` returned: then a
    reader must never outlive `Staging`, whose buffers it would write into."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def host_empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A host staging buffer (pinned where the library can copy from it asynchronously)."""
        return np.empty(shape, dtype)

    def device_empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A device buffer that copies go into, or None where each copy makes a fresh array."""
        return None

    def copy(
        self, dst: tuple[Any, ...] | None, src: tuple[np.ndarray, ...], after: Event
    ) -> tuple[tuple[Any, ...], Event]:
        """Start copying each host array of ``src`` to the device; in the reader thread.

        ``dst`` are the device buffers to copy into (views of `device_empty`'s,
        of ``src``'s shapes), or None. The copy must not start before ``after``
        (the end of the last compute that read ``dst``). Returns the device
        arrays and an event that completes when the copy has (after which
        ``src`` may be refilled).
        """
        return tuple(self.loaded.asarray(a) for a in src), None

    def wait(self, event: Event) -> None:
        """Make the compute that follows wait for ``event``; in the consumer's thread."""

    def synchronize(self, event: Event) -> None:
        """Block the calling thread until ``event`` has completed."""

    def record(self) -> Event:
        """An event completing when the compute submitted so far has; in the consumer's thread."""
        return None

    def to_numpy(self, a: Any) -> np.ndarray:
        """A result brought back to the host."""
        return self.loaded.to_numpy(a)


class CupyTransfer(Transfer):
    """CuPy: pinned staging buffers, a non-blocking copy stream, events. Not yet run on a GPU.

    The compute stream is the current stream of the thread that creates this
    object (the main thread, where the model runs): CuPy's legacy default
    stream, or that thread's own per-thread default stream.
    """

    asynchronous = True

    def __init__(self, loaded: Any) -> None:
        import cupy
        import cupyx

        super().__init__(loaded)
        self._cp, self._cpx, self._device = cupy, cupyx, loaded.device
        with self._device:
            self._stream = cupy.cuda.Stream(non_blocking=True)
            self._compute = cupy.cuda.get_current_stream()

    def host_empty(self, shape, dtype):
        return self._cpx.empty_pinned(shape, dtype)

    def device_empty(self, shape, dtype):
        with self._device:
            return self._cp.empty(shape, dtype)

    def copy(self, dst, src, after):
        with self._device:
            if after is not None:
                self._stream.wait_event(after)
            for d, s in zip(dst, src, strict=True):
                d.set(s, stream=self._stream)  # asynchronous: from pinned memory, on the stream
            return dst, self._stream.record()

    def wait(self, event):
        if event is not None:
            with self._device:
                self._compute.wait_event(event)

    def synchronize(self, event):
        if event is not None:
            event.synchronize()

    def record(self):
        with self._device:
            return self._compute.record()

    def to_numpy(self, a):
        # One contiguous copy on the device, then one plain copy back, rather
        # than a strided copy across the bus.
        with self._device:
            return self._cp.ascontiguousarray(a).get()


class TorchCudaTransfer(Transfer):
    """PyTorch on CUDA: pinned staging buffers, a copy stream, events. Not yet run on a GPU.

    The compute stream is the current stream of the model's device in the
    thread that creates this object. ``torch.cuda.Stream`` comes from PyTorch's
    pool of streams, created non-blocking. The device buffers are allocated on
    the compute stream and live as long as this object's `Staging`, so the
    caching allocator never hands them to another stream (no ``record_stream``
    needed).
    """

    asynchronous = True

    def __init__(self, loaded: Any) -> None:
        import torch

        super().__init__(loaded)
        self._torch, self._device = torch, loaded.device
        self._stream = torch.cuda.Stream(device=self._device)
        self._compute = torch.cuda.current_stream(self._device)

    def _dtype(self, dtype: Any) -> Any:
        return self._torch.from_numpy(np.empty(0, dtype)).dtype

    def host_empty(self, shape, dtype):
        # The NumPy view keeps the pinned memory alive (its base is a tensor of it).
        return self._torch.empty(shape, dtype=self._dtype(dtype), pin_memory=True).numpy()

    def device_empty(self, shape, dtype):
        return self._torch.empty(shape, dtype=self._dtype(dtype), device=self._device)

    def copy(self, dst, src, after):
        torch = self._torch
        with torch.cuda.stream(self._stream):
            if after is not None:
                self._stream.wait_event(after)
            for d, s in zip(dst, src, strict=True):
                d.copy_(torch.from_numpy(s), non_blocking=True)
            return dst, self._stream.record_event()

    def wait(self, event):
        if event is not None:
            self._compute.wait_event(event)

    def synchronize(self, event):
        if event is not None:
            event.synchronize()

    def record(self):
        return self._compute.record_event()

    def to_numpy(self, a):
        return self.loaded.to_numpy(a.contiguous())


def transfer_class(loaded: Any) -> type[Transfer]:
    """The `Transfer` for the backend ``loaded``: streams on a CUDA GPU, synchronous elsewhere."""
    if is_cupy_namespace(loaded.xp):
        return CupyTransfer
    if is_torch_namespace(loaded.xp) and getattr(loaded.device, "type", None) == "cuda":
        return TorchCudaTransfer
    return Transfer


def transfer_for(loaded: Any) -> Transfer:
    """The `Transfer` of the backend ``loaded``; create it in the thread that will compute."""
    return transfer_class(loaded)(loaded)


# -- the hand-off, generic over the primitives ----------------------------------------


@dataclass(eq=False)
class _Slot:
    host: tuple[np.ndarray, ...]
    device: tuple[Any, ...] | None
    copied: Event = None  # the last copy out of `host` (into `device`) is done
    consumed: Event = None  # the last compute reading `device` is done


@dataclass(eq=False)
class Chunk:
    """Rows ``start:stop`` of the input, on the backend: one array per staged input.

    On a GPU the arrays are views of a slot's device buffers: they are valid
    until the chunk is released (`release`, or asking `Staging` for the next
    chunk). The synchronous `Transfer` makes fresh arrays. Releasing the chunk
    drops its arrays (``arrays`` becomes empty), so that a chunk's copy on the
    backend is freed once the caller drops its own references, not kept alive
    while the next chunks are staged.
    """

    start: int
    stop: int
    arrays: tuple[Any, ...]
    ready: Event = field(repr=False)
    _slot: _Slot | None = field(repr=False)
    _release: Callable[[_Slot], None] = field(repr=False)

    def release(self) -> None:
        """Hand the buffers back for the chunk after next; the compute submitted so far may
        still be running (the next copy into them waits for it)."""
        self.arrays = ()
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._release(slot)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Staging:
    """The chunks of an input, read ahead and copied to the device in a second thread.

    Parameters
    ----------
    transfer : Transfer
        The primitives; `copy` and `synchronize` are called in the reader
        thread, `wait`, `record` and the buffer allocations in the caller's.
    fill : callable
        ``fill(host, start, stop)`` writes rows ``start:stop`` of each input
        into the host arrays ``host`` (one per input, ``stop - start`` rows).
    chunks : sequence of (start, stop)
        In the order they are wanted; none longer than a full chunk.
    buffers : sequence of (shape, dtype)
        One per input: the shape of a full chunk (its rows first) and its dtype.
    slots : int
        How many chunks may be staged at once (2: double buffering).
    close_source : callable, optional
        Called once ``fill`` will be called no more: by the reader as it ends
        (having read every chunk, stopped or failed), or by `close` if the
        reader never started. It closes the files ``fill`` reads.
    stop_timeout : float
        Seconds to wait for the reader when leaving by an exception, where the
        transfer is synchronous (`Transfer.asynchronous`); a reader still in
        ``fill`` then is left behind, and calls ``close_source`` when it ends.

    The buffers are allocated here, in the caller's thread; the reader starts
    on ``with``. Iterating yields `Chunk` in order, each ready to be used by
    the compute; the previous one is released when the next is asked for.
    """

    def __init__(
        self,
        transfer: Transfer,
        fill: Callable[[tuple[np.ndarray, ...], int, int], None],
        chunks: Sequence[tuple[int, int]],
        buffers: Sequence[tuple[tuple[int, ...], Any]],
        slots: int = 2,
        close_source: Callable[[], None] | None = None,
        stop_timeout: float = 1.0,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots: expected at least 1, got {slots}")
        self._transfer, self._fill, self._chunks = transfer, fill, list(chunks)
        self._close_source, self._stop_timeout = close_source, stop_timeout
        self._slots = []
        for _ in range(slots):
            host = tuple(transfer.host_empty(shape, dtype) for shape, dtype in buffers)
            device = tuple(transfer.device_empty(shape, dtype) for shape, dtype in buffers)
            if any(d is None for d in device):
                self._slots.append(_Slot(host, None))
            else:
                # The allocator may hand out memory that compute already queued
                # still reads; the first copy into it waits for that compute.
                self._slots.append(_Slot(host, device, consumed=transfer.record()))
        self._free: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)
        self._ready: queue.SimpleQueue[Chunk | _Failed] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._read_ahead, name="rnn-xp reader", daemon=True)

    def __enter__(self) -> Staging:
        self._thread.start()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            # Already failing: the cleanup must not hide why, nor wait for ever
            # on a read that hangs.
            with contextlib.suppress(Exception):
                self.close(timeout=self._stop_timeout)

    def __iter__(self) -> Iterator[Chunk]:
        for _ in self._chunks:
            item = self._ready.get()
            if isinstance(item, _Failed):
                raise item.error
            self._transfer.wait(item.ready)
            yield item
            item.release()

    def _release(self, slot: _Slot) -> None:
        slot.consumed = self._transfer.record()
        self._free.put(slot)

    def _read_ahead(self) -> None:
        try:
            for start, stop in self._chunks:
                slot = self._free.get()
                if slot is None or self._stopping.is_set():
                    return
                self._transfer.synchronize(slot.copied)  # its host buffers are read no more
                rows = slice(0, stop - start)  # the last chunk may be shorter
                host = tuple(h[rows] for h in slot.host)
                self._fill(host, start, stop)
                device = None if slot.device is None else tuple(d[rows] for d in slot.device)
                arrays, slot.copied = self._transfer.copy(device, host, slot.consumed)
                self._ready.put(Chunk(start, stop, arrays, slot.copied, slot, self._release))
        except BaseException as exc:  # raised again in the consumer's thread
            self._ready.put(_Failed(exc))
        finally:
            self._source_done()

    def _source_done(self) -> None:
        close, self._close_source = self._close_source, None
        if close is not None:
            close()

    def close(self, timeout: float | None = None) -> None:
        """Stop the reader, wait for it, and for every copy still in flight.

        With a ``timeout`` and a synchronous transfer, a reader that has not
        ended by then is left behind (see `Staging`); an asynchronous transfer
        always waits for it.
        """
        self._stopping.set()
        self._free.put(None)  # wakes a reader waiting for a free slot
        if self._thread.ident is None:
            self._source_done()
        else:
            self._thread.join(None if self._transfer.asynchronous else timeout)
            if self._thread.is_alive():
                return  # stuck in fill; it writes only into host arrays it holds
        for slot in self._slots:  # no copy may still write into buffers about to be freed
            self._transfer.synchronize(slot.copied)
