"""The batch job: run a saved model over a .npy of sequences, chunk by chunk.

`run_file` runs it in this process, reading the next chunk in a second thread
while the current one computes. `run_file_distributed` runs it on a
``dask.distributed`` cluster: one task per chunk, each reading its slice of the
input (memory-mapped) on the worker, running the model there and writing its
slice of the output. The input and output paths must then be visible to every
worker (one machine, or a shared file system).

In both, the outputs are written under a temporary name (``Y.npy.partial``)
and renamed only when every chunk is written, so a failed or interrupted job
never leaves a file that looks complete. A task that dies with its worker is
run again by Dask; since each task writes only its own slice, rerunning one
changes nothing else.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._backends import BackendUnavailable, for_run
from .io import load
from .model import _dtype_name

__all__ = ["BatchError", "run_file", "run_file_distributed"]

EXTRAS = {"numpy": None, "torch": "torch", "jax": "jax", "cupy": "cuda12"}


class BatchError(ValueError):
    """A problem with the job's inputs; its message is one line for the user."""


@dataclass(frozen=True)
class Job:
    weights: str
    input: str
    out: str
    lengths: str | None
    state_out: str | None
    batch_size: int
    dtype: str
    backend: str
    device: str | None
    N: int
    T: int
    F: int  # output features, num_directions * H
    S: int  # num_layers * num_directions
    H: int
    lstm: bool

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, self.N)) for s in range(0, self.N, self.batch_size)]


def backend_for(name: str, device: str | None):
    if name not in EXTRAS:
        raise BatchError(f"--backend: expected one of {', '.join(EXTRAS)}, got {name!r}")
    try:
        return for_run(name, device)
    except BackendUnavailable as exc:
        hint = f"; pip install 'rnn-xp[{EXTRAS[name]}]'" if EXTRAS[name] else ""
        if name == "cupy":
            hint += " (or [cuda13] for CUDA 13)"
        raise BatchError(f"--backend {name}: {exc}{hint}") from None


def _load_npy(path: str, what: str) -> np.ndarray:
    if not Path(path).is_file():
        raise BatchError(f"{what}: no such file {path!r}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BatchError(f"{what}: {path!r} is not a numeric .npy file ({exc})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise BatchError(f"{what}: {path!r} is not a numeric .npy file (dtype {a.dtype})")
    return a


def prepare(
    weights: str,
    input: str,
    out: str,
    *,
    batch_size: int = 1024,
    lengths: str | None = None,
    state_out: str | None = None,
    dtype: str | None = None,
    backend: str = "numpy",
    device: str | None = None,
) -> Job:
    """Check every input of the job before any work; return its description."""
    if batch_size < 1:
        raise BatchError(f"--batch-size: expected a positive integer, got {batch_size}")
    backend_for(backend, device)
    xs = _load_npy(input, "--input")
    head = load(weights)
    D = head.input_size
    if xs.ndim != 3 or xs.shape[2] != D:
        raise BatchError(
            f"--input: expected shape (N, T, D={D}) for weights {weights!r} "
            f"(input_size {D}), got {xs.shape}"
        )
    N, T = xs.shape[0], xs.shape[1]
    if lengths is not None:
        n = _load_npy(lengths, "--lengths")
        if n.shape != (N,) or n.dtype.kind not in "iu":
            raise BatchError(
                f"--lengths: expected integers of shape (N={N},), got {n.dtype} {n.shape}"
            )
    H = head.hidden_size
    return Job(
        str(weights),
        str(input),
        str(out),
        None if lengths is None else str(lengths),
        None if state_out is None else str(state_out),
        batch_size,
        dtype or _dtype_name(head._dtype),
        backend,
        device,
        N,
        T,
        head.num_directions * H,
        head.num_layers * head.num_directions,
        H,
        head.mode == "lstm",
    )


def _partial(path: str) -> Path:
    return Path(path).with_name(Path(path).name + ".partial")


def _create_outputs(job: Job) -> None:
    """The output files, full size, under their temporary names."""
    np.lib.format.open_memmap(_partial(job.out), "w+", job.dtype, (job.N, job.T, job.F)).flush()
    if job.state_out:
        shape = (2, job.S, job.N, job.H) if job.lstm else (job.S, job.N, job.H)
        np.lib.format.open_memmap(_partial(job.state_out), "w+", job.dtype, shape).flush()


def _finish(job: Job) -> None:
    os.replace(_partial(job.out), job.out)
    if job.state_out:
        os.replace(_partial(job.state_out), job.state_out)


@functools.lru_cache(maxsize=4)
def _model(weights: str, mtime: float, backend: str, device: str | None, dtype: str):
    """The model on the backend, loaded once per process (and per file version)."""
    loaded = for_run(backend, device)
    model = load(weights, like=loaded.asarray(np.zeros(1, dtype=dtype)))
    model.batch_first = True  # the files are batch-major whatever the model was trained with
    return loaded, model


def _compute(job: Job, start: int, stop: int, x=None, n=None):
    """Forward one chunk; ``x`` and ``n`` if already read (and moved to the device)."""
    loaded, model = _model(
        job.weights, os.path.getmtime(job.weights), job.backend, job.device, job.dtype
    )
    if x is None:
        x, n = _read(job, loaded, start, stop)
    out, h_n = model.forward(x, lengths=n, inference=True)
    states = [loaded.to_numpy(h) for h in (h_n if job.lstm else (h_n,))]
    return loaded.to_numpy(out), states


def _read(job: Job, loaded, start: int, stop: int):
    xs = np.load(job.input, mmap_mode="r")
    x = loaded.asarray(np.asarray(xs[start:stop], dtype=job.dtype))
    n = None
    if job.lengths is not None:
        n = loaded.asarray(np.asarray(np.load(job.lengths, mmap_mode="r")[start:stop]))
    return x, n


def _write(job: Job, start: int, stop: int, out: np.ndarray, states: list[np.ndarray]) -> None:
    ys = np.load(_partial(job.out), mmap_mode="r+")
    ys[start:stop] = out
    ys.flush()
    if job.state_out:
        s = np.load(_partial(job.state_out), mmap_mode="r+")
        if job.lstm:
            s[0, :, start:stop], s[1, :, start:stop] = states
        else:
            s[:, start:stop] = states[0]
        s.flush()


def _chunk_task(job: Job, start: int, stop: int) -> int:
    """What one Dask task does: read, compute and write one chunk; its size."""
    out, states = _compute(job, start, stop)
    _write(job, start, stop, out, states)
    return stop - start


def run_file(job: Job, progress: Callable[[int], Any] | None = None) -> None:
    """The job in this process; ``progress(n)`` after each chunk of n sequences."""
    _create_outputs(job)
    loaded, _ = _model(
        job.weights, os.path.getmtime(job.weights), job.backend, job.device, job.dtype
    )
    chunks = job.chunks()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Read (and move to the device) the next chunk while this one computes.
        pending = pool.submit(_read, job, loaded, *chunks[0])
        for i, (start, stop) in enumerate(chunks):
            x, n = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(_read, job, loaded, *chunks[i + 1])
            out, states = _compute(job, start, stop, x, n)
            _write(job, start, stop, out, states)
            if progress is not None:
                progress(stop - start)
    _finish(job)


def run_file_distributed(
    job: Job, client: Any, progress: Callable[[int], Any] | None = None
) -> None:
    """The job on a ``dask.distributed`` cluster through ``client``, one task per chunk."""
    from distributed import as_completed

    _create_outputs(job)
    futures = [
        client.submit(_chunk_task, job, start, stop, pure=False, retries=2)
        for start, stop in job.chunks()
    ]
    for future in as_completed(futures):
        n = future.result()  # raises if a chunk failed for good: no rename then
        if progress is not None:
            progress(n)
    _finish(job)
