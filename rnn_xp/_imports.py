"""How rnn_xp imports an optional array library, and what it says when it cannot."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["BackendNotInstalled", "BackendUnavailable", "import_library"]


class BackendUnavailable(Exception):
    """A backend cannot run here; the message says why."""


class BackendNotInstalled(BackendUnavailable):
    """Its library is not installed; the message names the extra that installs it."""


# The extra of rnn-xp that installs each library.
_EXTRAS = {
    "array_api_strict": "'rnn-xp[test]'",
    "torch": "'rnn-xp[torch]'",
    "jax": "'rnn-xp[jax]'",
    "dask.array": "'rnn-xp[dask]'",
    "cupy": "'rnn-xp[cuda12]' (or 'rnn-xp[cuda13]' for CUDA 13)",
    "onnx": "'rnn-xp[onnx]'",
}


def import_library(module: str, what: str) -> ModuleType:
    """``module``, imported; `BackendNotInstalled` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendNotInstalled(
            f"{what} is not installed ({exc}); pip install {_EXTRAS[module]}"
        ) from None
