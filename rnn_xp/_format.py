"""The weights file format, and writing it: `save` and what it shares with reading.

`rnn_xp.io` reads these files (and re-exports `save` and `partial_path`); this
module does not import `rnn_xp.model`, so `rnn_xp.model.Recurrent.save` can use
it without an import cycle. A model is read only through its attributes
(``mode``, ``input_size``, ..., ``proj_size``, ``state_dict()``), so any
`rnn_xp.Recurrent` is written, its cell built in or the user's.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._backends import dtype_name, refusal, to_numpy

__all__ = ["WeightsError", "partial_path", "save"]

FORMAT = 1
EXTRA = "extra."
CONFIG_KEYS = (
    "format",
    "mode",
    "input_size",
    "hidden_size",
    "num_layers",
    "bidirectional",
    "nonlinearity",
    "bias",
    "batch_first",
    "dropout",
    "dtype",
)
"""The keys of every configuration."""
OPTIONAL_KEYS = ("proj_size",)
"""Keys a configuration holds only when they differ from their default (proj_size: 0),
so a file of a model without them reads in versions that do not know them."""
DTYPES = ("float16", "float32", "float64")
"""Parameter dtypes both formats (and NumPy) hold."""

_KINDS = {dict: "dict", list: "list", str: "string", bool: "bool", int: "integer", float: "number"}


class WeightsError(ValueError):
    """A weights file that cannot be read as a model: one line, naming the argument.

    ``argument`` is the name under which the caller gave the file (``path`` in
    the Python API; the command line puts its option, such as ``--weights``,
    there) and ``detail`` says what is wrong with it, naming the file. A missing
    file raises a subclass that is also a `FileNotFoundError`; a missing optional
    package (``safetensors``, ``torch``) one that is also an `ImportError`.
    """

    def __init__(self, argument: str, detail: str) -> None:
        super().__init__(f"{argument}: {detail}")
        self.argument, self.detail = argument, detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in Dask workers too: it must survive pickling, and its args are
        # not its constructor's.
        return type(self), (self.argument, self.detail)


class _NotFound(WeightsError, FileNotFoundError):
    """A weights file that does not exist."""


class _MissingPackage(WeightsError, ImportError):
    """A weights file whose format needs an optional package that is not installed."""


class _Source(NamedTuple):
    """Where the tensors come from, for error messages: the argument and how to name it."""

    argument: str  # 'path' or 'state'
    name: str  # the file's path as repr, or 'the state_dict'

    def __str__(self) -> str:
        return self.name

    def error(self, detail: str) -> WeightsError:
        return WeightsError(self.argument, detail)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to one short line (values read from a file can be anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(keys: Any, limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(_short(k, 40) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def _differences(missing: Any, unexpected: Any) -> str:
    """``missing [...], unexpected [...]``, leaving out an empty one."""
    parts = [f"missing {_names(missing)}"] if missing else []
    if unexpected:
        parts.append(f"unexpected {_names(unexpected)}")
    return ", ".join(parts)


def _reason(exc: BaseException) -> str:
    """A library's message as one short line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _kind(value: Any) -> str:
    """What ``value`` is, in words: 'a list', 'a torch.Tensor', 'None'."""
    if value is None:
        return "None"
    kind = type(value)
    return f"a {_KINDS.get(kind) or kind.__module__ + '.' + kind.__qualname__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(path: Any) -> str:
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(
            f"path: expected a str or os.PathLike, got {type(path).__module__}."
            f"{type(path).__name__}"
        ) from None
    if "\0" in text:
        raise WeightsError("path", f"{text!r} contains a NUL character")
    return text


# -- configuration ------------------------------------------------------------

_CONFIG_ATTRIBUTES = (
    "mode",
    "input_size",
    "hidden_size",
    "num_layers",
    "bidirectional",
    "bias",
    "batch_first",
    "dropout",
    "_dtype",
    "state_dict",
)


def _nonlinearity(mode: str) -> str | None:
    """The configuration's ``nonlinearity`` for ``mode``: 'tanh' or 'relu' for a plain RNN."""
    return mode.removeprefix("rnn_") if mode in ("rnn_tanh", "rnn_relu") else None


def _config(model: Any) -> dict[str, Any]:
    """The configuration of ``model``, a `rnn_xp.Recurrent` (read through its attributes).

    ``mode`` is the model's, a user cell's ``kind`` for a model of one;
    ``proj_size`` is there only when it is not 0, so a file of any other model
    is the same, byte for byte, as before projections were written.
    """
    config = {
        "format": FORMAT,
        "mode": model.mode,
        "input_size": model.input_size,
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "bidirectional": model.bidirectional,
        "nonlinearity": _nonlinearity(model.mode),
        "bias": model.bias,
        "batch_first": model.batch_first,
        "dropout": model.dropout,
        "dtype": dtype_name(model._dtype),
    }
    proj_size = int(getattr(model, "proj_size", 0) or 0)
    if proj_size:
        config["proj_size"] = proj_size
    return config


# -- save -------------------------------------------------------------------------


def _suffix(path: str) -> str:
    suffix = Path(path).suffix
    if suffix not in (".npz", ".safetensors"):
        raise WeightsError("path", f"expected a .npz or .safetensors file, got {path!r}")
    return suffix


def _safetensors(src: _Source, doing: str) -> Any:
    """The ``safetensors`` package, or a one-line error naming the extra that installs it."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise _MissingPackage(
            src.argument,
            f"{doing} {src} needs the safetensors package; pip install 'rnn-xp[io]'",
        ) from None
    return safetensors


def partial_path(path: str | os.PathLike) -> str:
    """The name `save` writes ``path`` under before renaming it: ``w.npz.partial.npz``."""
    p = Path(path)
    return str(p.with_name(p.name + ".partial" + p.suffix))


def save(model: Any, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (and ``extra`` arrays) to ``path`` (.npz or .safetensors).

    Parameters
    ----------
    model : rnn_xp.Recurrent
        Of any mode, a user cell's too (its ``kind`` is saved as the mode; give
        the cell back to `rnn_xp.io.load` with ``cells=``). Its parameters must
        be float16, float32 or float64.
    path : str or os.PathLike
        Ends in ``.npz`` or ``.safetensors``; its folder must exist.
    extra : dict of str to array, optional
        Saved under ``extra.<key>``; each a bool, integer or float16/32/64 array
        of any supported library.

    Notes
    -----
    The file is written as ``<path>.partial<suffix>`` in the same folder and
    renamed, so an interrupted save never leaves a file that looks complete (and
    removes the partial file when it fails). The file gets the mode a plain
    ``open()`` gives, that is ``0o666`` less the process umask, in both formats.
    """
    if isinstance(model, type) or not all(hasattr(model, a) for a in _CONFIG_ATTRIBUTES):
        raise TypeError(f"model: expected a Recurrent, got {type(model).__name__}")
    text = _text(path)
    suffix = _suffix(text)
    src = _Source("path", repr(text))
    target = Path(text)
    if os.path.isdir(target):
        raise WeightsError("path", f"{text!r} is a folder; expected a {suffix} file to write")
    if not os.path.isdir(target.parent):
        raise WeightsError("path", f"the folder of {text!r} does not exist")
    st = _safetensors(src, "writing") if suffix == ".safetensors" else None
    dtype = dtype_name(model._dtype)
    if dtype not in DTYPES:
        raise TypeError(
            f"model: its parameters are {dtype}; {suffix} files hold {', '.join(DTYPES)} "
            "(convert the model first)"
        )
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in model.state_dict().items()}
    for k, v in (extra or {}).items():
        odd = refusal(v)  # a masked array's mask would be dropped
        if odd is not None:
            raise TypeError(f"extra: {_short(k)}: expected a plain array, got {odd}")
        a = np.ascontiguousarray(to_numpy(v))
        if not isinstance(k, str) or a.dtype.kind not in "biuf" or a.dtype.itemsize > 8:
            # An object array would be pickled into the .npz, which load refuses.
            raise TypeError(
                f"extra: expected str keys and bool, integer or float16/32/64 arrays, got "
                f"{_short(k)} of dtype {a.dtype}"
            )
        arrays[EXTRA + k] = a
    config = json.dumps(_config(model))
    tmp = Path(partial_path(text))
    failures = (OSError,) if st is None else (OSError, st.SafetensorError)
    done = False
    try:
        with suppress(FileNotFoundError):  # a stale partial file would keep its old mode
            os.unlink(tmp)
        # os.umask can only be read by setting it, for every thread at once; a file
        # created by open() has exactly the mode the umask (and the folder) allow.
        with open(tmp, "xb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if st is None:
                np.savez(f, __config__=np.array(config), **arrays)
        if st is not None:
            # safetensors writes a 0600 temporary file of its own and renames it.
            st.numpy.save_file(arrays, str(tmp), metadata={"rnn_xp": config})
            os.chmod(tmp, mode)
        os.replace(tmp, target)
        done = True
    except failures as exc:
        reason = getattr(exc, "strerror", None) or _reason(exc)
        raise WeightsError("path", f"cannot write {text!r} ({reason})") from None
    finally:
        if not done:
            with suppress(OSError):
                os.unlink(tmp)
