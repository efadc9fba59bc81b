"""The batch job: run a saved model over a .npy of sequences, chunk by chunk.

`run_file` runs it in this process: a second thread reads the next chunk and
starts its copy to the device while the current one computes (`_transfer`:
pinned buffers, a copy stream and events on CuPy and on torch with CUDA). It
reads the inputs through the files it opened at the start, never memory-mapped:
a mapped file truncated under the run kills the process (SIGBUS) at the first
read past its new end, where a read says so.
`run_file_distributed` runs it on a
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

import contextlib
import dataclasses
import errno
import functools
import math
import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _transfer
from ._backends import BackendNotInstalled, BackendUnavailable, for_run
from ._transfer import _Failed
from .io import _NPY_HEAD, WeightsError, load, npy_header
from .model import Recurrent, _dtype_name

__all__ = [
    "BatchError",
    "InputChanged",
    "RunFailed",
    "prepare",
    "run_file",
    "run_file_distributed",
]

BACKENDS = ("numpy", "torch", "jax", "cupy")
FLOAT_DTYPES = ("float16", "float32", "float64")


class BatchError(ValueError):
    """A problem with the job's inputs; its message is one line for the user."""


class InputChanged(OSError):
    """An input file changed in place during the run (truncated, or written to).

    ``filename`` is the file, ``strerror`` says what changed.
    """


class RunFailed(RuntimeError):
    """The backend failed during the work of `run_file` (a device error, out of
    device memory); its message is one line for the user, its cause the
    backend's own exception."""


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
    D: int  # input features
    F: int  # output features, num_directions * H
    S: int  # num_layers * num_directions
    H: int
    lstm: bool
    # Chunks computed at once in this process, each by a thread of its own
    # (`run_file`); 1 on backends where threads do not pay.
    jobs: int = 1
    # (device, inode) of each temporary output, once created: a worker writes
    # only into the very files this job created and locked.
    written: tuple[tuple[str, tuple[int, int]], ...] = ()

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, self.N)) for s in range(0, self.N, self.batch_size)]

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(option, path, shape)`` of each output file."""
        files = [("--out", self.out, (self.N, self.T, self.F))]
        if self.state_out:
            shape = (2, self.S, self.N, self.H) if self.lstm else (self.S, self.N, self.H)
            files.append(("--state-out", self.state_out, shape))
        return files


# -- checks shared with the rest of the command line ---------------------------------


def backend_for(name: str, device: str | None):
    """The backend ``name`` on ``device``, or a BatchError naming the option at fault.

    An install hint is given only when the library cannot be imported; a library
    that is installed but cannot use the device says what is wrong instead, and
    so does a device that exists but fails (the library's RuntimeError).
    """
    if name not in BACKENDS:
        raise BatchError(f"--backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    try:
        return for_run(name, device)
    except BackendNotInstalled as exc:
        raise BatchError(f"--backend: {exc}") from None
    except BackendUnavailable as exc:
        option = "--backend" if device is None else "--device"
        raise BatchError(f"{option}: {exc}") from None
    except RuntimeError as exc:
        if isinstance(exc, NotImplementedError):
            raise
        raise device_error(name, device, exc) from None


def device_error(backend: str, device: str | None, exc: BaseException) -> BatchError:
    """``exc``, raised by ``backend`` on ``device``, as one line naming the option at fault."""
    option, where = (
        ("--backend", "its default device") if device is None else ("--device", repr(device))
    )
    text = " ".join(str(exc).split()) or type(exc).__name__
    return BatchError(f"{option}: {backend} fails on {where}: {text}")


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same real path, or (hard or symbolic
    links) the same inode on the same device."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def partial_name(path: str | os.PathLike) -> str:
    """The temporary name an output of `run` is written under."""
    return os.fspath(path) + ".partial"


def check_output_path(
    path: str | os.PathLike,
    option: str,
    suffixes: Iterable[str],
    temporaries: Iterable[str] = (),
) -> str:
    """Refuse an output path that cannot be written, before any work.

    The path must end in one of ``suffixes``, must not be a folder or anything
    but a regular file, and its folder must exist and be writable; each of
    ``temporaries`` (the names it is written under first) must not be a folder.
    """
    text = os.fspath(path)
    suffixes = tuple(suffixes)
    if not text or text.endswith(("/", os.sep)):
        raise BatchError(f"{option}: expected a file name, got {text!r}")
    if os.path.isdir(text):
        raise BatchError(f"{option}: {text!r} is a folder, expected a file name")
    if os.path.lexists(text) and not os.path.isfile(text):
        raise BatchError(f"{option}: {text!r} exists and is not a regular file")
    if Path(text).suffix not in suffixes:
        names = (
            " or ".join(suffixes)
            if len(suffixes) < 3
            else (f"{', '.join(suffixes[:-1])} or {suffixes[-1]}")
        )
        raise BatchError(f"{option}: expected a {names} file name, got {text!r}")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise BatchError(f"{option}: the folder {folder!r} of {text!r} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BatchError(f"{option}: cannot write in the folder {folder!r} (permission denied)")
    longest = max(len(os.fsencode(os.path.basename(n))) for n in (text, *temporaries))
    limit = _name_max(folder)
    if longest > limit:
        raise BatchError(
            f"{option}: the file name {os.path.basename(text)!r} is too long: with its "
            f"temporary suffix it takes {longest} bytes; this file system allows {limit}"
        )
    for tmp in temporaries:
        # A symbolic link, even to a regular file, would have the output written
        # through it, over whatever it points to.
        if os.path.islink(tmp) or (os.path.lexists(tmp) and not os.path.isfile(tmp)):
            raise BatchError(
                f"{option}: its temporary file {tmp!r} exists and is not a regular file; "
                f"remove it or choose another {option}"
            )
    return text


def _name_max(folder: str) -> int:
    """The longest file name, in bytes, ``folder``'s file system takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):
        return 255


def check_not_an_input(outputs: dict[str, list[str]], inputs: dict[str, str | None]) -> None:
    """Refuse an output (or its temporary name) that is one of the inputs.

    ``outputs`` maps an option to its path followed by its temporary names;
    ``inputs`` maps an option to its path (None if not given). Paths are
    compared by real path and, for existing files, by inode (hard and
    symbolic links). Two outputs may not share a file either.
    """
    for option, names in outputs.items():
        for i, name in enumerate(names):
            label = repr(name) if i == 0 else f"its temporary file {name!r}"
            for source_option, source in inputs.items():
                if source is not None and same_file(name, source):
                    raise BatchError(
                        f"{option}: {label} is the same file as {source_option} {source!r}; "
                        "no output may overwrite an input"
                    )
    listed = list(outputs.items())
    for k, (option, names) in enumerate(listed):
        for other_option, other in listed[:k]:
            if any(same_file(a, b) for a in names for b in other):
                raise BatchError(
                    f"{option}: {names[0]!r} is the same file as {other_option} {other[0]!r} "
                    "(or its temporary file); give two different files"
                )


def load_weights(path: str | os.PathLike, option: str, like: Any = None) -> Recurrent:
    """`rnn_xp.load`, its failures as one line naming ``option``."""
    try:
        return load(path, like=like)
    except WeightsError as exc:
        raise BatchError(f"{option}: {exc.detail}") from None
    except MemoryError:
        raise BatchError(f"{option}: {os.fspath(path)!r} is too large to load here") from None


def read_npy(path: str | os.PathLike, option: str) -> np.ndarray:
    """A .npy file memory-mapped for reading; BatchError naming ``option`` if it is not one."""
    text = os.fspath(path)
    if not os.path.lexists(text):
        raise BatchError(f"{option}: no such file {text!r}")
    if not os.path.exists(text):
        raise BatchError(f"{option}: {text!r} is a broken symbolic link")
    if os.path.isdir(text):
        raise BatchError(f"{option}: {text!r} is a folder, expected a .npy file")
    if not os.path.isfile(text):
        raise BatchError(f"{option}: {text!r} is not a regular file, expected a .npy file")
    try:
        with open(text, "rb") as f:
            head = f.read(_NPY_HEAD)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise BatchError(f"{option}: cannot read {text!r} ({exc.strerror})") from None
    if not head:
        raise BatchError(f"{option}: {text!r} is empty (0 bytes), expected a .npy file")
    if head.startswith(b"PK"):
        raise BatchError(
            f"{option}: {text!r} is a .npz archive of several arrays, expected a .npy file "
            "(one array, as numpy.save writes it)"
        )
    if not head.startswith(b"\x93NUMPY"):
        raise BatchError(
            f"{option}: {text!r} is not a .npy file (it does not start with the .npy signature)"
        )
    # Every size the header states is checked against the file before NumPy
    # maps it (a crafted shape would overflow the mapping's length).
    try:
        npy_header(head, size)
    except ValueError as exc:
        raise BatchError(f"{option}: {text!r} {exc}") from None
    try:
        return np.load(text, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BatchError(f"{option}: cannot read {text!r} ({exc})") from None


def _float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" and dtype.itemsize in (2, 4, 8)


def _check_lengths(n: np.ndarray, N: int, T: int) -> None:
    """Every length an integer in [1, T]; the whole file, block by block."""
    if n.dtype.kind not in "iu":
        raise BatchError(f"--lengths: expected integers (any int or uint dtype), got {n.dtype}")
    if n.shape != (N,):
        raise BatchError(
            f"--lengths: expected shape (N,) = ({N},), one length per sequence of --input, "
            f"got {n.shape}"
        )
    block = 1 << 20  # a million lengths at a time: bounded memory for any N
    for start in range(0, N, block):
        part = np.asarray(n[start : start + block])
        bad = (part < 1) | (part > T)
        if bad.any():
            i = int(np.argmax(bad))
            raise BatchError(
                f"--lengths: expected every length in [1, T={T}], got {part[i]} at index "
                f"{start + i}"
            )


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
    jobs: int | None = 1,
) -> Job:
    """Check every input of the job before any work and before any file exists.

    Returns the job's description. Every problem raises `BatchError`, one line
    naming the command-line option at fault: the backend and device, the
    weights, the input (a real floating .npy of shape (N, T, D) with T >= 1;
    N = 0 gives empty outputs), every length, the outputs' folders, and that
    no output (nor its temporary ``.partial`` name) is one of the inputs.

    ``jobs`` is how many chunks `run_file` computes at once, each in a thread
    of its own, on NumPy and on torch on the CPU (see `threads_pay`; other
    backends take 1, and refuse more); None: as many as this process has
    cores, fewer if their chunks would not fit in memory (and never more than
    there are chunks). The default, 1, keeps `run_file` as it was: the
    computing in the caller's thread, one thread reading ahead; ``rnn-xp
    run`` owns its process and defaults to None. The outputs are the same
    whatever ``jobs`` (see `run_file`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise BatchError(f"--batch-size: expected a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise BatchError(f"--batch-size: expected a positive integer, got {batch_size}")
    if jobs is not None and (
        isinstance(jobs, bool) or not isinstance(jobs, int | np.integer) or jobs < 1
    ):
        raise BatchError(f"--jobs: expected a positive integer, got {jobs!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise BatchError(f"--dtype: expected one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    outputs = {"--out": check_output_path(out, "--out", [".npy"], [partial_name(out)])}
    if state_out is not None:
        outputs["--state-out"] = check_output_path(
            state_out, "--state-out", [".npy"], [partial_name(state_out)]
        )
    sources = {"--input": os.fspath(input), "--weights": os.fspath(weights)}
    if lengths is not None:
        sources["--lengths"] = os.fspath(lengths)
    check_not_an_input({k: [v, partial_name(v)] for k, v in outputs.items()}, sources)

    loaded = backend_for(backend, device)
    if jobs is not None and jobs > 1 and not threads_pay(loaded):
        raise BatchError(
            f"--jobs: only --backend numpy, and torch on the CPU, compute chunks in threads; "
            f"expected 1 for {_where(backend, device)}, got {jobs}"
        )
    head = load_weights(weights, "--weights")
    xs = read_npy(input, "--input")
    D = head.input_size
    if not _float_dtype(xs.dtype):
        raise BatchError(
            f"--input: expected real floating values (float16, float32 or float64), got {xs.dtype}"
        )
    if xs.ndim != 3 or xs.shape[2] != D:
        raise BatchError(
            f"--input: expected shape (N, T, D={D}) for --weights {os.fspath(weights)!r} "
            f"(input_size {D}), got {xs.shape}"
        )
    N, T = int(xs.shape[0]), int(xs.shape[1])
    if T < 1:
        raise BatchError(f"--input: expected at least one time step, got shape {xs.shape}")
    if lengths is not None:
        _check_lengths(read_npy(lengths, "--lengths"), N, T)

    name = dtype or np.result_type(xs.dtype, _dtype_name(head._dtype)).name
    H, dirs = head.hidden_size, head.num_directions
    F, S = dirs * H, head.num_layers * dirs
    lstm = head.mode == "lstm"
    itemsize = np.dtype(name).itemsize
    state_shape = (2, S, N, H) if lstm else (S, N, H)
    needed = itemsize * (N * T * F + (int(np.prod(state_shape)) if state_out else 0))
    for option, path in outputs.items():
        check_space(path, option, needed)
    # A chunk is read through a scratch buffer in the file's own dtype unless it
    # lands in the staging buffer as it is (C order, the computation's dtype).
    scratch = xs.dtype.itemsize if np.isfortran(xs) or xs.dtype != np.dtype(name) else 0
    chunks = -(-N // batch_size)
    if not threads_pay(loaded):
        jobs = 1
    wanted = max(1, min(available_cores() if jobs is None else int(jobs), chunks))
    jobs = _check_chunk_memory(
        min(batch_size, N),
        T,
        D,
        head.cell.gates * H,
        F,
        itemsize,
        scratch,
        jobs=wanted,
        fewer=jobs is None,
    )
    return Job(
        weights=str(weights),
        input=str(input),
        out=str(out),
        lengths=None if lengths is None else str(lengths),
        state_out=None if state_out is None else str(state_out),
        batch_size=int(batch_size),
        dtype=name,
        backend=backend,
        device=device,
        N=N,
        T=T,
        D=D,
        F=F,
        S=S,
        H=H,
        lstm=lstm,
        jobs=jobs,
    )


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13
    if count is not None:
        return count() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_pay(loaded: Any) -> bool:
    """Whether chunks computed in threads of their own beat one chunk at a time.

    NumPy runs its elementwise work on one core, so one chunk at a time leaves
    the others idle but for BLAS: at the issue's size (chunks of 1024 x 50
    sequences, a 2-layer bidirectional LSTM with H=64) on 2 cores, the work
    took 1.6x the time of two threads, each with a one-thread BLAS, and the
    whole run 1.48x (BENCHMARKS.md). torch on the CPU spends its intra-op
    threads on small kernels: 1.7-2.0x the work, 1.10-1.17x the whole run
    (torch's import is most of the rest). Both release the GIL in their
    kernels. A GPU runs one stream of kernels (the staged copies overlap them
    instead), and JAX compiles the whole loop to XLA, which has its own
    threads.
    """
    if loaded.name == "numpy":
        return True
    return loaded.name == "torch" and getattr(loaded.device, "type", None) == "cpu"


def _where(backend: str, device: str | None) -> str:
    return f"--backend {backend}" + ("" if device is None else f" --device {device}")


def check_space(path: str, option: str, needed: int) -> None:
    """``needed`` bytes fit in the folder of ``path`` (a full disk would kill the work mid-way).

    Where --out and --state-out lie in two folders, each is checked for all:
    an upper estimate, never a false refusal unless the disk is nearly full.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise BatchError(
            f"{option}: the output needs {human_bytes(needed)}, but the folder {folder!r} has "
            f"{human_bytes(free)} free"
        )


def _check_chunk_memory(
    B: int,
    T: int,
    D: int,
    G: int,
    F: int,
    itemsize: int,
    scratch_itemsize: int = 0,
    jobs: int = 1,
    fewer: bool = False,
) -> int:
    """The chunks in flight fit in this machine's memory; returns ``jobs``, or with ``fewer``
    the most chunks at once, up to ``jobs``, that fit."""
    memory = physical_memory()
    if memory is None:
        return jobs
    if fewer:
        while jobs > 1 and _chunk_memory(B, T, D, G, F, itemsize, scratch_itemsize, jobs) > memory:
            jobs -= 1
    needed = _chunk_memory(B, T, D, G, F, itemsize, scratch_itemsize, jobs)
    if needed <= memory:
        return jobs
    one = _chunk_memory(B, T, D, G, F, itemsize, scratch_itemsize, 1)
    if one <= memory:
        raise BatchError(
            f"--jobs: {jobs} chunks of {B} sequences of T={T} at once need about "
            f"{human_bytes(needed)} of memory, more than this machine's {human_bytes(memory)}; "
            "give a smaller --jobs or --batch-size"
        )
    raise BatchError(
        f"--batch-size: a chunk of {B} sequences of T={T} needs about "
        f"{human_bytes(one)} of memory, more than this machine's {human_bytes(memory)}; "
        "give a smaller --batch-size"
    )


def _chunk_memory(
    B: int, T: int, D: int, G: int, F: int, itemsize: int, scratch_itemsize: int, jobs: int
) -> int:
    """An upper estimate of the memory of ``jobs`` chunks in flight.

    Input: one chunk at a time (`_run_chunks`) holds the two staging buffers
    and, on a CPU backend, two copies of the chunk on the backend (the one
    computing, the next one read ahead; a released chunk's copy is dropped
    before the reader stages the one after); chunks in threads (`_Threads`)
    hold one buffer and one copy per thread. Then the reader's scratch buffer
    if it needs one (`_NpyRows`, one for all threads), and per chunk computing
    one layer's input projection, a layer's output and the result copied back.
    """
    inputs = 4 if jobs == 1 else 2 * jobs
    return B * T * ((inputs * D + jobs * (G + 3 * F)) * itemsize + D * scratch_itemsize)


class _Partial:
    """One output under its temporary name: created, locked, renamed when done.

    The file is opened without following a symbolic link and must be a regular
    file of one link (a link planted under the temporary name would have the
    output written over what it points to). It is locked for the whole run, so
    a second run writing the same output is refused rather than both
    corrupting it, and its blocks are allocated up front, so a disk that fills
    up refuses the run instead of killing it mid-way. A temporary file left by
    a run that died holds no lock and is reused. Writes go through this very
    file (`array`, or `open_written` on a worker, which checks its identity),
    and it is renamed only if it is still the one under the temporary name.
    Only a file this run holds is ever renamed or removed.
    """

    def __init__(self, option: str, path: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.option, self.path, self.tmp = option, path, partial_name(path)
        self.dtype, self.shape = np.dtype(dtype), shape
        self.fd: int | None = None
        self.identity: tuple[int, int] | None = None  # set once the file is ours
        try:
            self.fd = os.open(self.tmp, _WRITE_NO_LINKS, 0o666)
        except OSError as exc:
            if os.path.islink(self.tmp):
                raise BatchError(
                    f"{option}: its temporary file {self.tmp!r} is a symbolic link; remove it"
                ) from None
            raise BatchError(f"{option}: cannot create {self.tmp!r} ({_why(exc)})") from None
        try:
            self._own()
            header = {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": shape,
            }
            with os.fdopen(os.dup(self.fd), "r+b") as f:
                f.truncate(0)
                np.lib.format.write_array_header_1_0(f, header)
                self.offset = f.tell()
            size = self.offset + int(np.prod(shape)) * self.dtype.itemsize
            os.ftruncate(self.fd, size)
            _allocate(self.fd, size)
        except BatchError:
            self.discard()
            raise
        except OSError as exc:
            self.discard()
            raise BatchError(f"{option}: cannot create {self.tmp!r} ({_why(exc)})") from None
        except BaseException:
            self.discard()
            raise

    def _own(self) -> None:
        """Make the open file this run's, or BatchError (and the file is left alone)."""
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise BatchError(
                f"{self.option}: its temporary file {self.tmp!r} is not a regular file; remove it"
            )
        if st.st_nlink > 1:
            raise BatchError(
                f"{self.option}: its temporary file {self.tmp!r} is a hard link to another "
                "file; remove it"
            )
        busy = BatchError(
            f"{self.option}: another run is writing {self.tmp!r} now; wait for it, or choose "
            f"another {self.option}"
        )
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy from None
        # Between the open and the lock, another run may have renamed this file
        # to its output: then it is no longer the temporary file.
        if _identity_at(self.tmp) != (st.st_dev, st.st_ino):
            raise busy
        self.identity = (st.st_dev, st.st_ino)

    def array(self) -> np.memmap:
        """The output, memory-mapped through this run's own file."""
        with os.fdopen(os.dup(self.fd), "r+b") as f:
            return np.memmap(f, self.dtype, "r+", self.offset, self.shape)

    def finish(self) -> None:
        if _identity_at(self.tmp) != self.identity:
            self.identity = None  # whatever is there now is not ours: leave it
            raise BatchError(
                f"{self.option}: its temporary file {self.tmp!r} was replaced during the run; "
                f"nothing was written to {self.path!r}"
            )
        os.replace(self.tmp, self.path)
        self.identity = None
        self.close()

    def discard(self) -> None:
        if self.identity is not None and _identity_at(self.tmp) == self.identity:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
        self.identity = None
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


_WRITE_NO_LINKS = (
    os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _identity_at(path: str) -> tuple[int, int] | None:
    """(device, inode) of what is under ``path`` itself (a link is not followed)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks: a full disk then refuses now, not with SIGBUS mid-run."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None or size == 0:
        return
    try:
        allocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        # EOPNOTSUPP, EINVAL: a file system that cannot reserve; write as before


def open_written(job: Job, option: str) -> np.memmap:
    """On a worker: the output ``option`` of ``job``, checked to be the file the job created."""
    path = {"--out": job.out, "--state-out": job.state_out}[option]
    tmp = partial_name(path)
    fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != dict(job.written)[option]:
            raise OSError(errno.ESTALE, "not the temporary file this job created", tmp)
        with os.fdopen(os.dup(fd), "r+b") as f:
            head = f.read(_NPY_HEAD)
            dtype, shape, _, offset = npy_header(head, st.st_size)
            return np.memmap(f, dtype, "r+", offset, shape)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _outputs(job: Job):
    """The job's outputs, created full size under their temporary names; renamed at the end.

    Yields ``{option: _Partial}``. If the body fails, the temporary files are
    removed and nothing is renamed.
    """
    made: dict[str, _Partial] = {}
    try:
        for option, path, shape in job.outputs():
            made[option] = _Partial(option, path, job.dtype, shape)
        yield made
        for partial in made.values():
            partial.finish()
    except BaseException:
        for partial in made.values():
            partial.discard()
        raise


def _version(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


@functools.lru_cache(maxsize=4)
def _model(weights: str, version: tuple, backend: str, device: str | None, dtype: str):
    """The model on the backend, loaded once per process (and per file version).

    A batch run is inference: the model is in evaluation mode (no dropout). It
    computes in ``dtype``: its parameters are cast to it.
    """
    loaded = for_run(backend, device)
    model = load(weights, like=loaded.asarray(np.zeros(1, dtype=dtype)))
    if _dtype_name(model._dtype) != dtype:
        model = model.astype(dtype)
    model.batch_first = True  # the files are batch-major whatever the model was trained with
    model.eval()
    return loaded, model


def _compute(job: Job, start: int, stop: int, x=None, n=None, to_numpy=None):
    """Forward one chunk; ``x`` and ``n`` if already read (and moved to the device).

    The results come back through ``to_numpy`` (default: the backend's own).
    """
    loaded, model = _model(job.weights, _version(job.weights), job.backend, job.device, job.dtype)
    if x is None:
        x, n = _read(job, loaded, start, stop)
    to_numpy = to_numpy or loaded.to_numpy
    out, h_n = model.forward(x, lengths=n, inference=True)
    states = [to_numpy(h) for h in (h_n if job.lstm else (h_n,))]
    return to_numpy(out), states


def _read(job: Job, loaded, start: int, stop: int):
    xs = np.load(job.input, mmap_mode="r")
    x = loaded.asarray(np.asarray(xs[start:stop], dtype=job.dtype))
    n = None
    if job.lengths is not None:
        # Checked in prepare: integers in [1, T]; int64 whatever the file's dtype.
        n = np.asarray(np.load(job.lengths, mmap_mode="r")[start:stop], dtype=np.int64)
        n = loaded.asarray(n)
    return x, n


def _write(job: Job, files: dict, start: int, stop: int, out, states) -> None:
    """Write one chunk's outputs into ``files``, the memory-mapped outputs by option."""
    ys = files["--out"]
    ys[start:stop] = out
    ys.flush()
    if job.state_out:
        s = files["--state-out"]
        if job.lstm:
            s[0, :, start:stop], s[1, :, start:stop] = states
        else:
            s[:, start:stop] = states[0]
        s.flush()


def _chunk_task(job: Job, start: int, stop: int) -> int:
    """What one Dask task does: read, compute and write one chunk; its size."""
    out, states = _compute(job, start, stop)
    files = {option: open_written(job, option) for option, _, _ in job.outputs()}
    _write(job, files, start, stop, out, states)
    return stop - start


def run_file(job: Job, progress: Callable[[int], Any] | None = None) -> None:
    """The job in this process; ``progress(n)`` after each chunk of n sequences.

    With ``job.jobs`` > 1 (see `prepare`), that many chunks compute at once,
    each in a thread of its own (`_Threads`); otherwise one at a time while a
    second thread reads the next (`_transfer.Staging`). The outputs are the
    same either way, bit for bit: the chunks are the same, each is computed
    by the same calls, and on the backends that take threads (`threads_pay`)
    BLAS (torch) is held to one thread whenever there is more than one chunk,
    whatever ``jobs`` (`_one_thread_each`): OpenBLAS's products can differ in
    their last bits between one thread and several (its threaded driver
    splits K into other blocks: K = 500 and 1000 differed, 512 did not). So
    the outputs also do not depend on this machine's core count. A run of
    one chunk keeps BLAS's threads, which then have the cores to themselves.
    With N = 0 the outputs are empty arrays of the right shape. If the job
    fails, its temporary outputs are removed and nothing else is written.
    """
    chunks = job.chunks()
    transfer, source = _on_device(job, chunks)
    try:
        with (
            contextlib.nullcontext() if source is None else source,
            _outputs(job) as made,
            _one_thread_each(transfer, len(chunks)),
        ):
            files = {option: partial.array() for option, partial in made.items()}
            if isinstance(source, _Threads):
                source.run(files, progress)
            elif source is not None:
                _run_chunks(job, files, source, transfer, progress)
            del files  # unmapped before the rename
    except RuntimeError as exc:  # the outputs are removed by now
        if isinstance(exc, NotImplementedError | RunFailed):
            raise
        raise _run_failed(job, exc) from exc


def _run_failed(job: Job, exc: RuntimeError) -> RunFailed:
    """The backend's ``exc``, raised during the work, as one line naming the backend."""
    where = job.backend if job.device is None else f"{job.backend} on {job.device!r}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text:
        text += "; a smaller --batch-size needs less memory"
    return RunFailed(f"{where} failed during the run: {text}")


def _on_device(
    job: Job, chunks: list[tuple[int, int]]
) -> tuple[_transfer.Transfer, _transfer.Staging | _Threads | None]:
    """The model, the transfer and what feeds it the chunks, before any file: the staging
    buffers, or the threads of `_Threads` where ``job.jobs`` > 1 (None without chunks).

    A device that passed `backend_for` but fails to take the model or the
    buffers (busy, out of memory, a broken driver) is refused here, in one
    line naming the option, and no output has been created.
    """
    try:
        loaded, _ = _model(job.weights, _version(job.weights), job.backend, job.device, job.dtype)
        transfer = _transfer.transfer_for(loaded)
        if not chunks:
            return transfer, None
        threads = min(job.jobs, len(chunks))
        if threads > 1 and not transfer.asynchronous:  # `prepare` allows jobs only on a CPU
            return transfer, _Threads(job, transfer, threads)
        fill, buffers, close = _staged_inputs(job)
        try:
            return transfer, _transfer.Staging(transfer, fill, chunks, buffers, close_source=close)
        except BaseException:
            close()
            raise
    except RuntimeError as exc:
        if isinstance(exc, NotImplementedError):
            raise
        raise device_error(job.backend, job.device, exc) from None


def _staged_inputs(job: Job):
    """``fill(host, start, stop)``, writing rows ``start:stop`` of the inputs into the host
    buffers of a chunk; those buffers' ``(shape, dtype)`` for a full chunk; and ``close()``,
    closing the input files, opened here.

    The lengths (checked in `prepare`: integers in [1, T]) arrive as int64 whatever
    the file's dtype.
    """
    rows = min(job.batch_size, job.N)
    with contextlib.ExitStack() as opened:
        xs = opened.enter_context(_NpyRows(job.input, (job.N, job.T, job.D), "f", rows))
        buffers = [((rows, job.T, job.D), np.dtype(job.dtype))]
        ns = None
        if job.lengths is not None:
            ns = opened.enter_context(_NpyRows(job.lengths, (job.N,), "iu", rows))
            buffers.append(((rows,), np.dtype(np.int64)))
        close = opened.pop_all().close

    def fill(host: tuple[np.ndarray, ...], start: int, stop: int) -> None:
        xs.read(host[0], start, stop, casting="same_kind")
        if ns is not None:
            ns.read(host[1], start, stop, casting="unsafe")

    return fill, buffers, close


class _NpyRows:
    """Rows of a .npy file, read through the file opened once (never memory-mapped).

    A file removed, renamed or replaced by another under its name is still
    read whole: this is the file that was opened. One changed in place is
    refused with `InputChanged`: a read that ends early (the file was
    truncated), or a size or modification time that differs from the one at
    the start, checked after every read.

    Parameters
    ----------
    path : str
        The file; its header must still say ``shape`` and a dtype of one of
        the ``kinds`` (as `prepare` checked), or `InputChanged`.
    rows : int
        The most rows one `read` reads (the scratch buffer's size).
    """

    def __init__(self, path: str, shape: tuple[int, ...], kinds: str, rows: int) -> None:
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close)
        try:
            st = os.fstat(self._file.fileno())
            self._stamp = (st.st_size, st.st_mtime_ns)
            head = np.empty(min(_NPY_HEAD, st.st_size), np.uint8)
            self._read_at(0, head, "its header lies")
            try:
                dtype, found, fortran, self._offset = npy_header(head.tobytes(), st.st_size)
            except ValueError as exc:
                raise self._changed(f"since it was checked: now it {exc}") from None
            if found != shape or dtype.kind not in kinds:
                raise self._changed(f"since it was checked: now {dtype} of shape {found}")
        except BaseException:
            self.close()
            raise
        self.dtype, self.shape = dtype, shape
        # In Fortran order (which differs from C order only with two axes
        # longer than 1, as for `numpy.isfortran`) the rows of a chunk are one
        # run of bytes per column.
        self._fortran = fortran and sum(n > 1 for n in shape) > 1
        self._scratch: np.ndarray | None = None
        self._rows = rows

    def __enter__(self) -> _NpyRows:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _changed(self, what: str) -> InputChanged:
        return InputChanged(errno.EIO, f"changed {what}", self.path)

    def _read_at(self, offset: int, out: np.ndarray, what: str) -> None:
        """Fill the contiguous ``out`` with the file's bytes from ``offset``."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            self._file.seek(offset + done)
            n = self._file.readinto(view[done:])
            if not n:
                size = os.fstat(self._file.fileno()).st_size
                raise self._changed(
                    f"during the run: truncated to {size} bytes; {what} past its end"
                )
            done += n

    def read(self, out: np.ndarray, start: int, stop: int, casting: str) -> None:
        """Rows ``start:stop`` into ``out`` (C-contiguous, ``stop - start`` rows), cast."""
        rows, rest = stop - start, self.shape[1:]
        what = f"rows {start}:{stop} lie"
        row_bytes = math.prod(rest) * self.dtype.itemsize
        if not self._fortran and out.dtype == self.dtype and out.flags.c_contiguous:
            self._read_at(self._offset + start * row_bytes, out, what)
        else:
            if self._scratch is None:
                self._scratch = np.empty((math.prod(rest), self._rows), self.dtype)
            if self._fortran:
                # The file holds the array transposed, shape reversed, in C order:
                # column k of the rows, k over the other axes, starts at k * N + start.
                N, size = self.shape[0], self.dtype.itemsize
                for k, column in enumerate(self._scratch[:, :rows]):
                    self._read_at(self._offset + (k * N + start) * size, column, what)
                rows_read = self._scratch[:, :rows].reshape(*rest[::-1], rows).transpose()
            else:
                flat = self._scratch.reshape(-1)[: rows * math.prod(rest)]
                self._read_at(self._offset + start * row_bytes, flat, what)
                rows_read = flat.reshape(rows, *rest)
            np.copyto(out, rows_read, casting=casting)
        st = os.fstat(self._file.fileno())
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise self._changed(
                "during the run: written to (its size or modification time changed)"
            )


def _run_chunks(
    job: Job, files: dict, staging: _transfer.Staging, transfer: _transfer.Transfer, progress
) -> None:
    for chunk in staging:
        x, n = chunk.arrays if job.lengths is not None else (chunk.arrays[0], None)
        out, states = _compute(job, chunk.start, chunk.stop, x, n, transfer.to_numpy)
        # The reader may refill its buffers while this chunk is written; this
        # chunk's copy on the backend is freed now, not kept alive by ``x``
        # while the next ones are staged (`_check_chunk_memory` counts two).
        del x, n
        chunk.release()
        _write(job, files, chunk.start, chunk.stop, out, states)
        if progress is not None:
            progress(chunk.stop - chunk.start)


class _Threads:
    """The chunks of a job computed ``threads`` at a time, each thread reading, computing and
    writing whole chunks, taken in order, until none is left.

    One chunk at a time leaves every core but one idle during NumPy's
    elementwise work (and torch's intra-op threads do little on small
    kernels); here each thread has a core, BLAS (torch) being held to one
    thread by `run_file`. The model is shared: an inference forward changes
    nothing in it but its (empty) backward cache. The inputs are opened here, before any output
    exists (as for `_transfer.Staging`), and read by one thread at a time: the
    files share one offset and one scratch buffer, and a read is short beside
    a chunk's compute. Each thread reuses one input buffer for its chunks.

    Each finished chunk's size, and the first failure, reach the caller's
    thread (`run`), which raises the very exception; the other threads stop
    after their current chunk. As with `_transfer.Staging`, leaving by an
    exception waits for them only ``stop_timeout`` seconds: one stuck in a
    hung read is left behind (a daemon thread, holding its own references to
    what it reads and writes), so that Ctrl-C or SIGTERM ends the process. The
    last thread to end closes the input files; if none started, ``with`` does.
    """

    def __init__(
        self, job: Job, transfer: _transfer.Transfer, threads: int, stop_timeout: float = 1.0
    ) -> None:
        self._job, self._transfer, self._stop_timeout = job, transfer, stop_timeout
        self._chunks = job.chunks()
        self._next = 0  # the next chunk to take
        self._lock = threading.Lock()  # the input files and `_next`
        # `_alive` has a lock of its own: a thread hung in a read holds `_lock`, and
        # starting the next thread (or ending one) must not wait for it.
        self._alive_lock = threading.Lock()
        self._stopping = threading.Event()
        self._done: queue.SimpleQueue[int | _Failed] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name="rnn-xp chunks", daemon=True)
            for _ in range(threads)
        ]
        self._alive = self._started = 0
        self._files: dict = {}
        self._fill, self._buffers, self._close = _staged_inputs(job)

    def __enter__(self) -> _Threads:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if not self._started:  # never taken the lock: a thread left behind may hold it
            self._close()

    def run(self, files: dict, progress: Callable[[int], Any] | None) -> None:
        """Compute every chunk into ``files``, the memory-mapped outputs by option."""
        self._files = files
        failing = True
        try:
            for thread in self._threads:
                with self._alive_lock:
                    self._alive += 1
                try:
                    thread.start()
                except BaseException:
                    self._ended()
                    raise
                self._started += 1
            for _ in self._chunks:
                item = self._done.get()
                if isinstance(item, _Failed):
                    raise item.error
                if progress is not None:
                    progress(item)
            failing = False
        finally:
            self._stopping.set()
            for thread in self._threads[: self._started]:
                thread.join(self._stop_timeout if failing else None)

    def _take(self, host: tuple[np.ndarray, ...]) -> tuple[int, int, tuple] | None:
        """The next chunk, its rows read into the front of ``host``; None when none is left."""
        with self._lock:
            if self._stopping.is_set() or self._next == len(self._chunks):
                return None
            start, stop = self._chunks[self._next]
            self._next += 1
            rows = tuple(h[: stop - start] for h in host)  # the last chunk may be shorter
            self._fill(rows, start, stop)
        return start, stop, rows

    def _work(self) -> None:
        job, transfer = self._job, self._transfer
        try:
            host = tuple(transfer.host_empty(shape, dtype) for shape, dtype in self._buffers)
            while (chunk := self._take(host)) is not None:
                start, stop, rows = chunk
                if self._stopping.is_set():
                    return  # another thread failed while this one read
                arrays, _ = transfer.copy(None, rows, None)  # a fresh copy: `host` is free
                x, n = arrays if job.lengths is not None else (arrays[0], None)
                del arrays
                out, states = _compute(job, start, stop, x, n, transfer.to_numpy)
                del x, n  # this chunk's copy is freed before the next is read
                _write(job, self._files, start, stop, out, states)
                self._done.put(stop - start)
        except BaseException as exc:  # raised again in the caller's thread
            self._stopping.set()
            self._done.put(_Failed(exc))
        finally:
            self._ended()

    def _ended(self) -> None:
        with self._alive_lock:
            self._alive -= 1
            last = self._alive == 0
        if last:
            self._close()


@contextlib.contextmanager
def _one_thread_each(transfer: _transfer.Transfer, chunks: int):
    """BLAS (NumPy) or torch's intra-op pool held to one thread during a run of several
    ``chunks``, on the backends that take threads (`threads_pay`; not a GPU's transfer).

    The outputs then do not depend on how many chunks compute at once (see
    `run_file`), and the threads of `_Threads` each take a core: a BLAS of as
    many threads again in each would fight them for the cores. ``--jobs 1``
    so runs on one core: on 2 cores, 0.96-1.19x the time of one chunk at a
    time with OpenBLAS's 2 threads at H=64, 1.5x at H=512 (BENCHMARKS.md).
    OpenBLAS's threads also lose much on a busy machine, where its idle
    workers spin on the cores others need: with other jobs keeping both
    cores busy, 20 chunks at the issue's size took 34-39 s one at a time with
    them, 9.4-9.6 s in two threads without. Both settings are process-wide;
    they are restored on the way out.
    """
    if chunks < 2 or transfer.asynchronous or not threads_pay(transfer.loaded):
        yield
    elif transfer.loaded.name == "torch":
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            yield


def run_file_distributed(
    job: Job, client: Any, progress: Callable[[int], Any] | None = None
) -> None:
    """The job on a ``dask.distributed`` cluster through ``client``, one task per chunk.

    With N = 0 no task is submitted and the outputs are empty arrays of the
    right shape. If a chunk fails for good, the remaining tasks are cancelled
    and the temporary outputs removed.
    """
    from distributed import as_completed

    futures = []
    with _outputs(job) as made:
        # Absolute paths (the workers' working directories are their own) and
        # the identity of the files to write into.
        job = dataclasses.replace(
            job,
            **{
                k: os.path.abspath(getattr(job, k))
                for k in ("weights", "input", "out", "lengths", "state_out")
                if getattr(job, k) is not None
            },
            written=tuple((option, p.identity) for option, p in made.items()),
        )
        try:
            futures = [
                client.submit(_chunk_task, job, start, stop, pure=False, retries=2)
                for start, stop in job.chunks()
            ]
            for future in as_completed(futures) if futures else ():
                n = future.result()  # raises if a chunk failed for good: no rename then
                if progress is not None:
                    progress(n)
        except BaseException:
            if futures:
                client.cancel(futures)
            raise
