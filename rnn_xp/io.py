"""Weights on disk: `save`, `load` and `load_torch`.

Writing (`save`, `partial_path`, the format's constants) lives in
`rnn_xp._format`, which does not import `rnn_xp.model`; this module reads, and
re-exports them.

Two formats, chosen by the file's suffix:

* ``.npz``: one array per parameter, under torch's names, plus ``__config__``, the
  configuration as a JSON string stored as a NumPy unicode array.
* ``.safetensors``: the same tensors; the configuration is in the header's
  metadata under ``"rnn_xp"``. Needs the ``safetensors`` package (extra ``io``).

The configuration holds ``format``, ``mode``, ``input_size``, ``hidden_size``,
``num_layers``, ``bidirectional``, ``nonlinearity``, ``bias``, ``batch_first``,
``dropout`` and ``dtype``, and ``proj_size`` when it is not 0 (an LSTM with
projections; files without it read as 0, as they did before it existed).
``mode`` is a built-in one (`rnn_xp.MODES`) or the ``kind`` of a user's
`rnn_xp.cells.Cell`, which `load` then needs back: ``load(path, cells=MyCell())``
(a file holds parameters, never code). Extra arrays (a readout layer, say) may be saved beside
the model under keys starting with ``extra.``; `load_extra` returns them. A round
trip reproduces the parameters bit for bit.

Reading treats the file as untrusted. Nothing is ever unpickled (a ``.npz`` is
parsed member by member with `numpy.lib.format`, never through ``np.load``; a
torch file goes through ``torch.load(weights_only=True)``), and every size a file
states is compared with the file's real size and with the sizes its configuration
implies before anything of that size is allocated or decompressed. Every way a
file can be wrong raises `WeightsError`, whose message is one line.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from array_api_compat import array_namespace

from ._format import (
    CONFIG_KEYS,
    DTYPES,
    EXTRA,
    FORMAT,
    OPTIONAL_KEYS,
    WeightsError,
    _config,  # noqa: F401 (re-exported, as before the split)
    _differences,
    _is_int,
    _kind,
    _MissingPackage,
    _names,
    _nonlinearity,
    _NotFound,
    _reason,
    _safetensors,
    _short,
    _Source,
    _suffix,
    _text,
    partial_path,  # noqa: F401 (re-exported: rnn_xp.cli imports it from here)
    save,
)
from .cells import Cell
from .model import MODES, TORCH_MODES, Recurrent

__all__ = ["WeightsError", "infer_config", "load", "load_extra", "load_torch", "save"]

# Limits on what a file may claim before it is believed. A .npy header of ours is
# under 128 bytes and a configuration under 400 characters; a model's safetensors
# header grows by ~100 bytes a tensor, so 16 MiB is ~160,000 tensors.
_NPY_HEAD = 16384
_CONFIG_BYTES = 1 << 20
_SAFETENSORS_HEADER = 16 << 20
# Deflate cannot expand its input more than 1032-fold; a member claiming more is a
# zip bomb (or damaged) and is refused before it is decompressed.
_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
}
# The errors reading a damaged zip archive can raise, besides BadZipFile.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    OverflowError,
    struct.error,
    NotImplementedError,
    RuntimeError,
)
# torch's parameter names (weight_hr: an LSTM's projections), less _l{k} and _reverse.
_TORCH_KEY = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(0|[1-9][0-9]{0,5})")
"""The modes of torch.nn.RNN (two nonlinearities), LSTM and GRU."""


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    # Python integers: a claimed shape cannot overflow this product.
    return math.prod(shape) * dtype.itemsize


# -- configuration ------------------------------------------------------------


def _what(value: Any) -> str:
    """What a ``cells`` argument is: a type's name, or a Cell class with how to make one."""
    if isinstance(value, type):
        name = f"{value.__module__}.{value.__qualname__}"
        if issubclass(value, Cell):
            return f"the class {name}, not an instance of it ({value.__name__}())"
        return f"the class {name}"
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _cells(cells: Any) -> dict[str, Cell]:
    """The user cells given to a loader, by kind; TypeError or ValueError naming ``cells``."""
    if cells is None:
        return {}
    if isinstance(cells, Cell):
        items: Sequence[Any] = (cells,)
    elif isinstance(cells, Sequence) and not isinstance(cells, (str, bytes, bytearray)):
        items = cells
    else:
        raise TypeError(
            f"cells: expected an rnn_xp.cells.Cell instance or a list of them, got {_what(cells)}"
        )
    out: dict[str, Cell] = {}
    where: dict[str, int] = {}  # each kind's item, for messages
    for i, cell in enumerate(items):
        if not isinstance(cell, Cell):
            raise TypeError(
                f"cells: item {i} is {_what(cell)}; expected an instance of a subclass of "
                "rnn_xp.cells.Cell"
            )
        kind = cell.kind
        if not isinstance(kind, str) or not kind:
            raise TypeError(
                f"cells: item {i}, {cell!r}, has kind {_short(kind)}; expected a non-empty string"
            )
        if kind in MODES:
            if MODES[kind] is cell:
                continue  # the built-in cell itself: the mode's name says as much
            raise ValueError(
                f"cells: item {i}, {cell!r}, has kind {kind!r}, the name of a built-in mode; "
                "give its class a kind of its own"
            )
        if kind in out and out[kind] is not cell:
            raise ValueError(
                f"cells: items {where[kind]} and {i} are both of kind {kind!r}; "
                "expected one cell per kind"
            )
        out[kind] = cell
        where.setdefault(kind, i)
    return out


def _check_config(
    src: _Source, config: Any, cells: Mapping[str, Cell], call: str = "load"
) -> dict[str, Any]:
    """``config`` (parsed JSON) if it is a configuration this version reads.

    ``cells`` are the user cells given to the loader, by kind: a ``mode`` that
    is not built in must be one of them (WeightsError naming ``cells``, the
    file's other checks passed, otherwise; ``call`` names the loader in it).
    """

    def bad(key: str, expected: str) -> WeightsError:
        return src.error(
            f"{src}: the configuration's {key} is {_short(config[key])}; expected {expected}"
        )

    if not isinstance(config, dict):
        raise src.error(f"{src}: the configuration is {_kind(config)}; expected a JSON object")
    if "format" not in config:
        raise src.error(f"{src}: the configuration has no format; expected format {FORMAT}")
    if not _is_int(config["format"]) or config["format"] < 1:
        raise bad("format", f"a positive integer (format {FORMAT})")
    if config["format"] > FORMAT:
        raise src.error(
            f"{src} was written by a newer rnn-xp (format {config['format']}); this version "
            f"reads format {FORMAT}: upgrade rnn-xp"
        )
    missing = [k for k in CONFIG_KEYS if k not in config]
    unexpected = [k for k in config if k not in CONFIG_KEYS + OPTIONAL_KEYS]
    if missing or unexpected:
        raise src.error(f"{src}: the configuration's keys: {_differences(missing, unexpected)}")
    mode = config["mode"]
    if not isinstance(mode, str) or not mode:
        raise bad("mode", f"one of {', '.join(map(repr, MODES))} or a cell's kind (a string)")
    for key in ("input_size", "hidden_size", "num_layers"):
        if not _is_int(config[key]) or config[key] < 1:
            raise bad(key, "a positive integer")
    for key in ("bidirectional", "bias", "batch_first"):
        if not isinstance(config[key], bool):
            raise bad(key, "true or false")
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad("dropout", "a probability in [0, 1)")
    if config["dtype"] not in DTYPES:
        raise bad("dtype", f"one of {', '.join(map(repr, DTYPES))}")
    nonlinearity = _nonlinearity(mode)
    if config["nonlinearity"] != nonlinearity:
        raise bad("nonlinearity", f"{nonlinearity!r} for mode {_short(mode)}")
    if "proj_size" in config:
        proj_size = config["proj_size"]
        if not _is_int(proj_size) or proj_size < 0:
            raise bad("proj_size", "a non-negative integer")
        if proj_size and mode != "lstm":
            raise bad("proj_size", f"0 for mode {_short(mode)}: only mode 'lstm' has projections")
        if proj_size >= config["hidden_size"]:
            raise bad("proj_size", f"less than hidden_size ({config['hidden_size']})")
    if mode not in MODES and mode not in cells:
        given = f" (the cells given are of kind {_names(cells)})" if cells else ""
        raise WeightsError(
            "cells",
            f"{src}: the model's mode {_short(mode)} is not a built-in one; pass its cell, an "
            f"rnn_xp.cells.Cell of kind {_short(mode)}: {call}(path, cells=MyCell()){given}",
        )
    return dict(config)


def _parse_config(
    src: _Source, text: str, cells: Mapping[str, Cell], call: str = "load"
) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not JSON, too deep, too many digits
        raise src.error(f"{src}: the configuration is not valid JSON ({_reason(exc)})") from None
    return _check_config(src, config, cells, call)


def _describe(config: dict[str, Any]) -> str:
    proj_size = config.get("proj_size", 0)
    return (
        f"{config['mode']}, input_size {config['input_size']}, hidden_size "
        f"{config['hidden_size']}{f', proj_size {proj_size}' if proj_size else ''}, "
        f"{config['num_layers']} layer(s)"
        f"{', bidirectional' if config['bidirectional'] else ''}"
        f"{'' if config['bias'] else ', no bias'}"
    )


# -- checking tensors against a configuration ------------------------------------


class _Tensor(NamedTuple):
    """What a file says about one array, before its data is read."""

    dtype: np.dtype
    shape: tuple[int, ...]


def _configured(
    src: _Source, config: dict[str, Any], like: Any, cells: Mapping[str, Cell]
) -> Recurrent:
    """The model ``config`` describes, with no parameters: nothing is allocated.

    ``config`` is checked (`_check_config`), its mode built in or one of ``cells``.
    """
    mode = config["mode"]
    args = [config[k] for k in ("input_size", "hidden_size", "num_layers", "bias")]
    try:
        return Recurrent._configured(
            mode if mode in MODES else cells[mode],
            *args,
            batch_first=config["batch_first"],
            bidirectional=config["bidirectional"],
            dropout=config["dropout"],
            like=like,
            dtype=config["dtype"],
            proj_size=config.get("proj_size", 0),
        )
    except TypeError as exc:
        if like is None:
            raise
        # The configuration is checked: only like's library can lack its dtype.
        raise TypeError(
            f"like: cannot hold the {config['dtype']} parameters of {src} "
            f"({str(exc).removeprefix('dtype: ')})"
        ) from None


def _check_tensors(
    src: _Source,
    config: dict[str, Any],
    found: dict[str, _Tensor],
    cells: Mapping[str, Cell] | None = None,
) -> None:
    """Check that ``found`` (the model's tensors, extras left out) fits ``config`` exactly.

    The number of tensors is compared first, by arithmetic (one layer's count,
    from the configured model, which holds no parameters, times the layers),
    so a configuration claiming 10**9 layers costs nothing; the names, dtypes
    and shapes then.
    """
    model = _configured(src, config, None, cells or {})
    per_layer = len(model._layer_specs(0)) * model.num_directions
    needed = per_layer * config["num_layers"]
    if needed > len(found) + 64:
        raise src.error(
            f"{src} holds {len(found)} parameter arrays; expected {needed} for {_describe(config)}"
        )
    shapes = model._shapes()
    missing, unexpected = set(shapes) - set(found), set(found) - set(shapes)
    if missing or unexpected:
        raise src.error(
            f"{src}: expected the parameters of {_describe(config)}; "
            f"{_differences(missing, unexpected)}"
        )
    for name, shape in shapes.items():
        dtype, actual = found[name]
        if dtype.name != config["dtype"]:
            raise src.error(
                f"{src}: {name} has dtype {dtype}; expected {config['dtype']}, the "
                "configuration's dtype"
            )
        if actual != shape:
            raise src.error(
                f"{src}: {name} has shape {_short(actual)}; expected {shape} for "
                f"{_describe(config)}"
            )


def _build(
    src: _Source, config: dict[str, Any], params: dict[str, np.ndarray], like: Any
) -> Recurrent:
    """A model of ``config`` (a built-in mode) holding ``params``; WeightsError unless they fit."""
    _check_tensors(src, config, {k: _Tensor(v.dtype, tuple(v.shape)) for k, v in params.items()})
    model = _configured(src, config, like, {})
    model.load_state_dict(params)
    return model


def _check_like(like: Any) -> None:
    if like is None:
        return
    try:
        array_namespace(like)
    except TypeError:
        raise TypeError(
            "like: expected an array of the library, on the device, that should hold the "
            f"parameters, got {type(like).__module__}.{type(like).__name__}"
        ) from None


# -- reading files ------------------------------------------------------------------


@contextmanager
def _opened(src: _Source, text: str) -> Iterator[tuple[BinaryIO, int]]:
    """``text`` open for reading, and its size; a regular file or a WeightsError."""
    try:
        info = os.stat(text)
    except FileNotFoundError:
        if os.path.lexists(text):
            raise WeightsError("path", f"{text!r} is a broken symbolic link") from None
        raise _NotFound("path", f"no such file {text!r}") from None
    except OSError as exc:
        raise WeightsError("path", f"cannot read {text!r} ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise WeightsError("path", f"{text!r} is a folder; expected a weights file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a device never end
        raise WeightsError("path", f"{text!r} is not a regular file")
    try:
        f = open(text, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise WeightsError("path", f"cannot read {text!r} ({exc.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise src.error(f"{src} is empty (0 bytes)")
        yield f, size


def _zip(src: _Source, f: BinaryIO, size: int, what: str) -> zipfile.ZipFile:
    """``f`` as a zip archive whose members' stated sizes are possible in ``size`` bytes.

    Only stored and deflated members are accepted. A stored member holds as
    many bytes as it claims; a deflated one cannot claim more than deflate can
    produce; the members' compressed bytes must fit in the file without being
    shared (overlapping members are the classic zip bomb).
    """
    try:
        archive = zipfile.ZipFile(f)
        members = archive.infolist()
    except _ZIP_ERRORS as exc:
        raise src.error(
            f"{src} is not a readable {what} (damaged, truncated or not a zip archive: "
            f"{_reason(exc)})"
        ) from None
    used = 0
    for info in members:
        name = _short(info.filename, 40)
        if info.flag_bits & 0x1:
            raise src.error(f"{src}: member {name} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise src.error(
                f"{src}: member {name} uses compression method {info.compress_type}; "
                "expected stored (0) or deflated (8)"
            )
        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size != info.compress_size) or (
            info.file_size > _DEFLATE_RATIO * info.compress_size
        ):
            raise src.error(
                f"{src}: member {name} claims {info.file_size} bytes from "
                f"{info.compress_size} {'stored' if stored else 'deflated'} bytes"
            )
        used += info.compress_size
        if info.header_offset + info.compress_size > size or used > size:
            raise src.error(
                f"{src}: member {name} claims {info.compress_size} bytes beyond the "
                f"file's {size} (truncated or damaged)"
            )
    return archive


def npy_header(head: bytes, size: int) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """``(dtype, shape, fortran, offset)`` of a .npy array: ``size`` bytes, ``head`` first.

    ``head`` holds at least the header (16 KiB suffice for any we accept). The
    header must be version 1.0 or 2.0, of a dtype without Python objects, with a
    shape whose data fills exactly the rest of the ``size`` bytes: so no size it
    states is believed before it is checked, and nothing is ever unpickled.
    Otherwise ValueError, whose message is a phrase to follow the array's name.
    The dtype's kind (plain numbers, a string) is the caller's to check.
    """
    buf = io.BytesIO(head)
    try:
        # Parsing the header evaluates a Python literal: warnings (a Python 2
        # header, an odd escape, a deprecated dtype alias) mean a file not from
        # numpy.save, and are refused like the errors.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            version = np.lib.format.read_magic(buf)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(buf, max_header_size=_NPY_HEAD)
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        SyntaxError,
        RecursionError,
        MemoryError,  # only the literal parser's stack: the header is at most 16 KiB
        Warning,
    ) as exc:
        raise ValueError(f"is not a valid .npy array ({_reason(exc)})") from None
    if dtype.hasobject:
        raise ValueError("holds Python objects (pickled data), which rnn_xp never reads")
    if not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"has an invalid shape {_short(shape)}")
    offset = buf.tell()
    if size != offset + _nbytes(shape, dtype):
        raise ValueError(
            f"holds {size - offset} data bytes; its header ({dtype}, shape {_short(shape)}) "
            f"needs {_nbytes(shape, dtype)}"
        )
    return dtype, shape, fortran, offset


class _Member(NamedTuple):
    """A .npy member of a .npz: its zip entry, header and where its data starts."""

    info: zipfile.ZipInfo
    tensor: _Tensor
    fortran: bool
    offset: int


class _Npz:
    """A .npz archive read member by member, each header checked before its data."""

    def __init__(self, src: _Source, f: BinaryIO, size: int) -> None:
        self.src = src
        self.zip = _zip(src, f, size, ".npz archive")
        self.infos: dict[str, zipfile.ZipInfo] = {}
        for info in self.zip.infolist():
            name = info.filename.removesuffix(".npy")
            if not info.filename.endswith(".npy"):
                raise src.error(f"{src}: member {_short(info.filename, 40)} is not a .npy array")
            if name in self.infos:
                raise src.error(f"{src} holds two members named {_short(info.filename, 40)}")
            self.infos[name] = info
        if "__config__" not in self.infos:
            raise src.error(
                f"{src} has no rnn_xp configuration (no __config__ member); expected a .npz "
                "written by rnn_xp's save"
            )
        self.members: dict[str, _Member] = {}

    def names(self) -> list[str]:
        return [k for k in self.infos if k != "__config__"]

    def header(self, name: str) -> _Tensor:
        """``name``'s dtype and shape, from a header read within the first 16 KiB."""
        if name not in self.members:
            self.members[name] = self._header(name)
        return self.members[name].tensor

    def _header(self, name: str) -> _Member:
        src, info, label = self.src, self.infos[name], _short(name, 40)
        try:
            with self.zip.open(info) as m:
                head = m.read(_NPY_HEAD)
        except _ZIP_ERRORS as exc:
            raise src.error(f"{src}: member {label} cannot be read ({_reason(exc)})") from None
        try:
            dtype, shape, fortran, offset = npy_header(head, info.file_size)
        except ValueError as exc:
            raise src.error(f"{src}: {label} {exc}") from None
        if dtype.kind not in ("U" if name == "__config__" else "biuf"):
            expected = "a string" if name == "__config__" else "bool, integer or float numbers"
            raise src.error(f"{src}: {label} has dtype {dtype}; expected {expected}")
        return _Member(info, _Tensor(dtype, shape), fortran, offset)

    def config(self) -> str:
        tensor = self.header("__config__")
        if tensor.shape != () or tensor.dtype.itemsize > _CONFIG_BYTES:
            raise self.src.error(
                f"{self.src}: __config__ has shape {_short(tensor.shape)} and dtype "
                f"{tensor.dtype}; expected one string (a 0-d unicode array) of at most 1 MiB"
            )
        try:
            return str(self.read(["__config__"])["__config__"][()])
        except (ValueError, UnicodeError) as exc:  # code points that are not characters
            raise self.src.error(
                f"{self.src}: __config__ is not a valid string ({_reason(exc)})"
            ) from None

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        """The arrays ``names``, whose headers have been checked (their sizes believed)."""
        out = {}
        for name in names:
            info, (dtype, shape), fortran, offset = self.members[name]
            data = np.empty(_nbytes(shape, dtype), np.uint8)
            try:
                with self.zip.open(info) as m:
                    m.read(offset)
                    done = 0
                    while done < data.size:
                        chunk = m.read(min(_CHUNK, data.size - done))
                        if not chunk:
                            raise EOFError("the member ends early")
                        data[done : done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                        done += len(chunk)
                    m.read(1)  # at the end: zipfile checks the CRC
            except _ZIP_ERRORS as exc:
                raise self.src.error(
                    f"{self.src}: member {_short(name, 40)} cannot be read ({_reason(exc)})"
                ) from None
            out[name] = data.view(dtype).reshape(shape, order="F" if fortran else "C")
        return out


class _Safetensors:
    """A .safetensors file whose header is parsed and checked here, data read by the library.

    The library's own checks are not relied on: the header's length, JSON,
    dtypes, shapes and offsets (contiguous, covering exactly the rest of the
    file) are checked first, so the library only reads a well-formed file.
    """

    def __init__(self, src: _Source, f: BinaryIO, size: int, text: str) -> None:
        self.src, self.text = src, text
        head = f.read(8)
        if len(head) < 8:
            raise src.error(
                f"{src} is too short for a .safetensors file ({size} bytes; the header length "
                "alone takes 8)"
            )
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _SAFETENSORS_HEADER):
            raise src.error(
                f"{src} claims a {n}-byte header, but {size - 8} bytes follow the header "
                f"length (truncated or damaged; at most {_SAFETENSORS_HEADER} are read)"
            )
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique)
        except (ValueError, RecursionError) as exc:
            raise src.error(f"{src}: the header is not valid JSON ({_reason(exc)})") from None
        if not isinstance(header, dict):
            raise src.error(f"{src}: the header is {_kind(header)}; expected a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise src.error(f"{src}: the header's __metadata__ is not a map of strings")
        if "rnn_xp" not in metadata:
            raise src.error(
                f"{src} has no rnn_xp configuration (no rnn_xp in its metadata); expected a "
                ".safetensors written by rnn_xp's save"
            )
        self.metadata = metadata
        self.tensors = {k: _safetensors_entry(src, k, v) for k, v in header.items()}
        end = 0
        for name, (_, begin, stop) in sorted(self.tensors.items(), key=lambda kv: kv[1][1:]):
            if begin != end:
                raise src.error(
                    f"{src}: tensor {_short(name, 40)} starts at data byte {begin}; expected "
                    f"{end} (tensors follow each other without gaps)"
                )
            end = stop
        if end != size - 8 - n:
            raise src.error(
                f"{src} is truncated or damaged: its header describes {end} bytes of tensors; "
                f"{size - 8 - n} follow it"
            )

    def names(self) -> list[str]:
        return list(self.tensors)

    def header(self, name: str) -> _Tensor:
        return self.tensors[name][0]

    def config(self) -> str:
        return self.metadata["rnn_xp"]

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        st = _safetensors(self.src, "reading")
        try:
            with st.safe_open(self.text, framework="numpy") as f:
                out = {k: f.get_tensor(k) for k in names}
        except (st.SafetensorError, OSError, ValueError) as exc:
            raise self.src.error(f"{self.src} cannot be read ({_reason(exc)})") from None
        for k, a in out.items():  # the file may have changed since its header was read
            if (a.dtype.name, a.shape) != (self.header(k).dtype.name, self.header(k).shape):
                raise self.src.error(f"{self.src} changed while it was read")
        return out


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON allows repeated keys; readers disagree on which one wins.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"repeated key {_short(key, 40)}")
        out[key] = value
    return out


def _safetensors_entry(src: _Source, name: str, entry: Any) -> tuple[_Tensor, int, int]:
    """One tensor of a safetensors header: its dtype and shape, and its data's offsets."""
    where = f"{src}: tensor {_short(name, 40)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise src.error(f"{where} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _SAFETENSORS_DTYPES:
        raise src.error(
            f"{where} has dtype {_short(dtype)}; expected one of "
            f"{', '.join(_SAFETENSORS_DTYPES)} (NumPy dtypes)"
        )
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise src.error(f"{where} has shape {_short(shape)}; expected a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(n) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise src.error(f"{where} has data_offsets {_short(offsets)}; expected [begin, end]")
    tensor = _Tensor(np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"), tuple(shape))
    if offsets[1] - offsets[0] != _nbytes(tensor.shape, tensor.dtype):
        raise src.error(
            f"{where} takes {offsets[1] - offsets[0]} bytes; its dtype and shape "
            f"({dtype}, {_short(tensor.shape)}) need {_nbytes(tensor.shape, tensor.dtype)}"
        )
    return tensor, offsets[0], offsets[1]


def _read(
    path: str | os.PathLike, like: Any, extra: bool, cells: Mapping[str, Cell]
) -> tuple[dict[str, Any], Any]:
    """The configuration and either the model (``extra`` False) or the extra arrays.

    Every header, extras' too (so that `load` and `load_extra` accept the same
    files), is checked, and the model's against the configuration, before any
    data is read. ``cells``: the user cells given, by kind (see `_cells`).
    """
    text = _text(path)
    suffix = _suffix(text)
    src = _Source("path", repr(text))
    with _opened(src, text) as (f, size):
        if suffix == ".npz":
            reader: _Npz | _Safetensors = _Npz(src, f, size)
        else:
            _safetensors(src, "reading")
            reader = _Safetensors(src, f, size, text)
        config = _parse_config(src, reader.config(), cells, "load_extra" if extra else "load")
        found = {k: reader.header(k) for k in reader.names()}
        params = [k for k in found if not k.startswith(EXTRA)]
        _check_tensors(src, config, {k: found[k] for k in params}, cells)
        if extra:
            return config, reader.read([k for k in found if k.startswith(EXTRA)])
        model = _configured(src, config, like, cells)
        model.load_state_dict(reader.read(params))
        return config, model


def load(path: str | os.PathLike, like: Any = None, cells: Any = None) -> Recurrent:
    """Read a model written by `save`; its parameters go to ``like``'s namespace and device.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npz`` or ``.safetensors`` file.
    like : array, optional
        Its library and device receive the parameters; NumPy when None.
    cells : rnn_xp.cells.Cell or sequence of them, optional
        The user cells the file's model may be of: a file whose mode is not a
        built-in one (`rnn_xp.MODES`) holds the parameters of a cell whose
        ``kind`` is that mode, and needs an instance of it here (a file never
        holds code). Ignored for a built-in mode.

    Raises
    ------
    WeightsError
        For any file that is not exactly a model written by `save` (missing,
        damaged, truncated, of another format, or inconsistent); one line.
        Its ``argument`` is ``cells`` for a model of a user cell not in ``cells``.
    TypeError, ValueError
        For ``cells`` that are not `rnn_xp.cells.Cell` instances, one per kind.
    """
    kinds = _cells(cells)
    _check_like(like)
    return _read(path, like, extra=False, cells=kinds)[1]


def load_extra(path: str | os.PathLike, cells: Any = None) -> dict[str, np.ndarray]:
    """The extra arrays saved beside the model, without their ``extra.`` prefix.

    The file is checked as `load` checks it, model included: a model of a user
    cell needs that cell in ``cells``, as for `load`.
    """
    _, arrays = _read(path, None, extra=True, cells=_cells(cells))
    return {k[len(EXTRA) :]: v for k, v in arrays.items()}


# -- torch state_dict files -----------------------------------------------------------


def infer_config(
    state: Mapping[str, np.ndarray], mode: str | None = None, batch_first: bool = False
) -> dict[str, Any]:
    """The configuration of a torch ``state_dict`` of an RNN, LSTM or GRU module.

    Everything follows from the keys and shapes except the nonlinearity of a
    plain RNN ('rnn_tanh' or 'rnn_relu', which must then be given as ``mode``)
    and ``batch_first``. The whole ``state`` is checked against the result:
    names, dtypes (one floating dtype) and shapes, every layer and direction.
    The result is a configuration as `save` writes it: ``proj_size`` is there
    only for an LSTM with projections.

    Parameters
    ----------
    state : dict of str to numpy.ndarray
        ``weight_ih_l{k}`` (G*H, D or directions*H), ``weight_hh_l{k}`` (G*H, H),
        optionally ``bias_ih_l{k}``, ``bias_hh_l{k}`` (G*H,), and the same with
        ``_reverse`` for a bidirectional module; G is 1, 3 or 4 gates. An LSTM
        with projections (``proj_size`` P) adds ``weight_hr_l{k}`` (P, H); its
        ``weight_hh_l{k}`` is then (4H, P), and layer k > 0 takes
        directions*P features.
    mode : {None, 'rnn_tanh', 'rnn_relu', 'lstm', 'gru'}
    batch_first : bool

    Raises
    ------
    WeightsError
        Its ``argument`` is ``state`` for a ``state`` that is not such a
        state_dict, ``mode`` when ``mode`` is missing or contradicts it.
    """
    return _infer(_Source("state", "the state_dict"), state, mode, batch_first)


def _infer(
    src: _Source, state: Mapping[str, Any], mode: str | None, batch_first: bool
) -> dict[str, Any]:
    where = "" if src.argument == "state" else f" in {src}"
    if mode is not None and (not isinstance(mode, str) or mode not in TORCH_MODES):
        raise WeightsError(
            "mode",
            f"expected None or one of {', '.join(map(repr, TORCH_MODES))}, got {_short(mode)}"
            f"{' (torch has no such module)' if mode in MODES else ''}",
        )
    if not isinstance(batch_first, (bool, np.bool_)):
        raise TypeError(f"batch_first: expected a bool, got {_short(batch_first)}")
    if not isinstance(state, Mapping):
        raise src.error(f"{src} is {_kind(state)}; expected a dict of arrays (a state_dict)")
    parsed, unexpected = {}, []
    for key in state:
        m = _TORCH_KEY.fullmatch(key.removesuffix("_reverse")) if isinstance(key, str) else None
        if m is None:
            unexpected.append(key)
        else:
            parsed[key] = m[1], int(m[2]), key.endswith("_reverse")
    if unexpected:
        nested = [k for k in unexpected if isinstance(k, str) and "." in k]
        hint = (
            "; keys like these belong to a larger module: save the RNN's own state_dict"
            if nested and any(_TORCH_KEY.fullmatch(k.rsplit(".", 1)[1]) for k in nested)
            else ""
        )
        raise src.error(
            f"{src} has keys {_names(map(str, unexpected))} that are not torch.nn.RNN, LSTM or "
            f"GRU parameters (weight_ih_l0, weight_hh_l0, ...){hint}"
        )
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            raise src.error(f"{src}: {key} is {_kind(value)}; expected an array")
        if value.dtype.kind != "f" or value.dtype.name not in DTYPES:
            raise src.error(f"{src}: {key} has dtype {value.dtype}; expected {', '.join(DTYPES)}")
    if "weight_ih_l0" not in state or "weight_hh_l0" not in state:
        raise src.error(f"{src} lacks weight_ih_l0 or weight_hh_l0; expected both")
    w_ih, w_hh = state["weight_ih_l0"], state["weight_hh_l0"]
    if w_ih.ndim != 2 or w_hh.ndim != 2 or w_hh.shape[1] < 1 or w_ih.shape[1] < 1:
        raise src.error(
            f"{src}: weight_ih_l0 has shape {_short(w_ih.shape)} and weight_hh_l0 "
            f"{_short(w_hh.shape)}; expected (G*H, D) and (G*H, H) with D, H >= 1"
        )
    P = 0  # proj_size: an LSTM with projections has weight_hr_l{k} (P, H)
    if "weight_hr_l0" in state:
        w_hr = state["weight_hr_l0"]
        if w_hr.ndim != 2 or not 1 <= w_hr.shape[0] < w_hr.shape[1]:
            raise src.error(
                f"{src}: weight_hr_l0 has shape {_short(w_hr.shape)}; expected (P, H) with "
                "1 <= P < H, an LSTM's projections (proj_size P, hidden_size H)"
            )
        P, H = int(w_hr.shape[0]), int(w_hr.shape[1])  # H from the cell state's side
        if w_hh.shape != (4 * H, P):
            raise src.error(
                f"{src}: weight_hh_l0 has shape {w_hh.shape}; expected (4*H, P) = "
                f"{(4 * H, P)} for an LSTM with projections (weight_hr_l0 {w_hr.shape})"
            )
        G = 4
    else:
        H = int(w_hh.shape[1])
        G, rest = divmod(int(w_hh.shape[0]), H)
        if rest or G not in (1, 3, 4):
            raise src.error(
                f"{src}: weight_hh_l0 has shape {w_hh.shape}; expected (G*H, H) with G = 1 "
                "(RNN), 3 (GRU) or 4 (LSTM) gates"
            )
    layers = sorted({layer for _, layer, _ in parsed.values()})
    if layers != list(range(len(layers))):
        raise src.error(
            f"{src} has parameters for layers {_names(layers, 6)}; expected layers 0 to "
            f"{layers[-1]} without gaps"
        )
    reverse = {layer for _, layer, rev in parsed.values() if rev}
    if reverse and reverse != set(layers):
        raise src.error(
            f"{src} has reverse (bidirectional) parameters for layers {_names(reverse, 6)} "
            f"only; expected them for every layer, 0 to {layers[-1]}"
        )
    dtypes = sorted({v.dtype.name for v in state.values()})
    if len(dtypes) > 1:
        raise src.error(f"{src} mixes dtypes {', '.join(dtypes)}; expected one")
    inferred = {4: "lstm", 3: "gru"}.get(G)
    if mode is None:
        if inferred is None:
            raise WeightsError(
                "mode",
                "a plain RNN's state_dict does not say its nonlinearity; "
                f"give --mode rnn_tanh or --mode rnn_relu{where}",
            )
        mode = inferred
    if mode != inferred if inferred is not None else not mode.startswith("rnn"):
        raise WeightsError("mode", f"{mode!r} does not match a state_dict with {G} gate(s){where}")
    config = {
        "format": FORMAT,
        "mode": mode,
        "input_size": int(w_ih.shape[1]),
        "hidden_size": H,
        "num_layers": len(layers),
        "bidirectional": bool(reverse),
        "nonlinearity": _nonlinearity(mode),
        "bias": "bias_ih_l0" in state,
        "batch_first": bool(batch_first),
        "dropout": 0.0,
        "dtype": dtypes[0],
    }
    if P:
        config["proj_size"] = P
    _check_tensors(src, config, {k: _Tensor(v.dtype, tuple(v.shape)) for k, v in state.items()})
    return config


def load_torch(
    path: str | os.PathLike, mode: str | None = None, batch_first: bool = False, like: Any = None
) -> Recurrent:
    """A model from a torch ``state_dict`` file, read with ``torch.load(weights_only=True)``.

    Parameters
    ----------
    path : str or os.PathLike
        What ``torch.save(module.state_dict(), path)`` wrote for a
        ``torch.nn.RNN``, ``LSTM`` (projections, ``proj_size``, included) or
        ``GRU`` (torch's zip format, the default since torch 1.6). A checkpoint
        ``{"state_dict": ..., ...}`` (or ``"model_state_dict"``) is unwrapped.
    mode : {None, 'rnn_tanh', 'rnn_relu', 'lstm', 'gru'}
        Needed for a plain RNN, whose state_dict does not say its nonlinearity.
    batch_first : bool
    like : array, optional
        Its library and device receive the parameters; NumPy when None.

    Notes
    -----
    The file is memory-mapped (``mmap=True``), so storages are views of it and a
    pickle claiming a huge storage allocates nothing; the zip archive's stated
    sizes are checked first.

    Raises
    ------
    WeightsError
        For a file that is not such a state_dict (``argument`` ``path``), or a
        ``mode`` missing for a plain RNN or contradicting the file (``mode``).
    """
    text = _text(path)
    src = _Source("path", repr(text))
    _check_like(like)
    try:
        import torch
    except ImportError:
        raise _MissingPackage(
            "path", f"reading {text!r} needs PyTorch; pip install 'rnn-xp[torch]'"
        ) from None
    with _opened(src, text) as (f, size):
        if f.read(4) != b"PK\x03\x04":
            raise src.error(
                f"{src} is not a torch.save file of torch >= 1.6 (a zip archive): another "
                "format, damaged, or saved by an older torch (load and save it again)"
            )
        f.seek(0)
        members = _zip(src, f, size, "torch.save file").infolist()
    if not any(info.filename.endswith("/data.pkl") for info in members):
        raise src.error(f"{src} is a zip archive but not a torch.save file (it has no data.pkl)")
    if any(info.filename.endswith("/constants.pkl") for info in members):
        raise src.error(
            f"{src} is a TorchScript archive (torch.jit.save), not a state_dict; save "
            "module.state_dict() instead"
        )
    packed = [info.filename for info in members if info.compress_type != zipfile.ZIP_STORED]
    if packed:  # with mmap=True, torch would take a compressed record's bytes for data
        raise src.error(
            f"{src}: member {_short(packed[0], 40)} is compressed; torch.save stores its "
            "records as they are"
        )
    with warnings.catch_warnings():
        # A torch file can make torch warn (an old pickle protocol, say); the
        # outcome is what counts, and it is checked below.
        warnings.simplefilter("ignore")
        try:
            raw = torch.load(text, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise src.error(_refused(src, exc)) from None
        except (
            RuntimeError,
            AssertionError,  # torch checks some of the pickle's structure with assert
            EOFError,
            OSError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            struct.error,
            OverflowError,
            zipfile.BadZipFile,
        ) as exc:
            raise src.error(
                f"{src} is not a readable torch.save file (damaged or truncated: {_reason(exc)})"
            ) from None
        state = _torch_state(src, raw, torch, size)
    return _build(src, _infer(src, state, mode, batch_first), state, like)


def _refused(src: _Source, exc: pickle.UnpicklingError) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, as one line.

    torch's message is many lines and suggests ``weights_only=False``; what it
    refused (a GLOBAL, an opcode) is picked out of it.
    """
    text = " ".join(str(exc).split())
    found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
    name = found[1] if found else ""
    if "torch.nn.modules" in text or name.startswith("torch.nn."):
        return (
            f"{src} holds a whole pickled module ({name or 'torch.nn.Module'}); "
            "save module.state_dict() instead"
        )
    # A state_dict's pickle only names torch's and collections' classes: another
    # name is an object of its own, a damaged one of those is a damaged file.
    if name and name.split(".")[0] not in ("torch", "collections", "builtins"):
        return (
            f"{src} holds a pickled {name}, which torch.load(weights_only=True) refuses; "
            "expected a state_dict of tensors (save module.state_dict())"
        )
    reason = text.partition("WeightsUnpickler error:")[2].split(". ")[0].strip()
    return f"{src} is not a readable torch.save file (damaged: {reason or _reason(exc)})"


def _torch_state(src: _Source, raw: Any, torch: Any, size: int) -> dict[str, np.ndarray]:
    """The state_dict in what torch.load returned, as NumPy copies of its tensors.

    Values under keys that are not RNN parameters are passed on as they are, for
    `_infer` to name those keys.
    """
    if isinstance(raw, Mapping) and not any(
        isinstance(k, str) and _TORCH_KEY.match(k) for k in raw
    ):
        for key in ("state_dict", "model_state_dict"):  # a training checkpoint
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping):
        raise src.error(f"{src} holds {_kind(raw)}, not a state_dict (a dict of tensors)")
    state: dict[Any, Any] = {}
    for key, value in raw.items():
        what = f"{src}: {_short(key, 40)}"
        if not isinstance(key, str) or not _TORCH_KEY.fullmatch(key.removesuffix("_reverse")):
            state[key] = value
            continue
        if not isinstance(value, torch.Tensor):
            raise src.error(f"{what} is {_kind(value)}; expected a tensor")
        if value.dtype not in (torch.float16, torch.float32, torch.float64):
            hint = " (convert the module with .float() first)" if value.is_floating_point() else ""
            raise src.error(
                f"{what} has dtype {value.dtype}; expected a float16, float32 or float64 "
                f"tensor{hint}"
            )
        if value.layout != torch.strided:
            raise src.error(f"{what} is a {value.layout} tensor; expected a dense one")
        state[key] = value
    # The tensors are views of the memory-mapped file's storages. Their copies,
    # one per distinct view (a tensor tied under two names is copied once),
    # must not take more bytes than the storages hold: views that repeat their
    # storage (expanded, overlapping) would inflate a small file in memory.
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    views = {_view(v): k for k, v in tensors.items()}
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in tensors.values()
    }
    total = sum(tensors[k].numel() * tensors[k].element_size() for k in views.values())
    if total > sum(storages.values()):
        raise src.error(
            f"{src}: its tensors take {total} bytes, more than their storages' "
            f"{sum(storages.values())}: views that repeat their storage (expanded or "
            "overlapping); save a state_dict of plain tensors"
        )
    copies: dict[tuple, np.ndarray] = {}
    for key, value in tensors.items():
        view = _view(value)
        if view not in copies:
            try:
                # A copy: the tensor is a view of the memory-mapped file.
                copies[view] = np.array(value.detach().resolve_conj().resolve_neg().numpy())
            except (RuntimeError, TypeError) as exc:
                what = f"{src}: {_short(key, 40)}"
                raise src.error(f"{what} cannot be read as an array ({_reason(exc)})") from None
        state[key] = copies[view]
    return state


def _view(t: Any) -> tuple:
    """What makes two tensors the same data: storage, offset, shape, strides, dtype."""
    storage = t.untyped_storage().data_ptr()
    return storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype
