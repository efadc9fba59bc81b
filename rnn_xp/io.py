"""Weights on disk: `save`, `load` and `load_torch`.

Two formats, chosen by the file's suffix:

* ``.npz``: one array per parameter, under torch's names, plus ``__config__``, the
  configuration as a JSON string stored as a NumPy unicode array. It loads with
  ``allow_pickle=False``.
* ``.safetensors``: the same tensors; the configuration is in the header's
  metadata under ``"rnn_xp"``. Needs the ``safetensors`` package (extra ``io``).

The configuration holds ``mode``, ``input_size``, ``hidden_size``, ``num_layers``,
``bidirectional``, ``nonlinearity``, ``bias``, ``batch_first``, ``dropout`` and
``dtype``. Extra arrays (a readout layer, say) may be saved beside the model
under keys starting with ``extra.``; `load_extra` returns them. A round trip
reproduces the parameters bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._backends import asarray
from .model import MODES, Recurrent, _dtype_name

__all__ = ["infer_config", "load", "load_extra", "load_torch", "save"]

FORMAT = 1
EXTRA = "extra."


def _config(model: Recurrent) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "mode": model.mode,
        "input_size": model.input_size,
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "bidirectional": model.bidirectional,
        "nonlinearity": model.mode.removeprefix("rnn_") if model.mode.startswith("rnn") else None,
        "bias": model.bias,
        "batch_first": model.batch_first,
        "dropout": model.dropout,
        "dtype": _dtype_name(model._dtype),
    }


def _to_numpy(a: Any) -> np.ndarray:
    # Any supported library: torch tensors via .cpu(), CuPy via .get(), the rest
    # through the buffer protocol or __array__.
    for method in ("detach", "cpu", "get"):
        if hasattr(a, method) and not isinstance(a, np.ndarray):
            a = getattr(a, method)()
    return np.asarray(a)


def _suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix
    if suffix not in (".npz", ".safetensors"):
        raise ValueError(f"path: expected a .npz or .safetensors file, got {os.fspath(path)!r}")
    return suffix


def save(model: Recurrent, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (and ``extra`` arrays) to ``path`` (.npz or .safetensors).

    The file is written under a temporary name and renamed, so an interrupted
    save never leaves a file that looks complete.
    """
    suffix = _suffix(path)
    arrays = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in model.state_dict().items()}
    arrays |= {EXTRA + k: np.ascontiguousarray(_to_numpy(v)) for k, v in (extra or {}).items()}
    config = json.dumps(_config(model))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial" + suffix)
    if suffix == ".npz":
        np.savez(tmp, __config__=np.array(config), **arrays)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(tmp), metadata={"rnn_xp": config})
    os.replace(tmp, path)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    suffix = _suffix(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights: no such file {os.fspath(path)!r}")
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "__config__" not in f.files:
                raise ValueError(f"weights: {os.fspath(path)!r} has no rnn_xp configuration")
            config = json.loads(str(f["__config__"]))
            arrays = {k: f[k] for k in f.files if k != "__config__"}
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if "rnn_xp" not in meta:
                raise ValueError(f"weights: {os.fspath(path)!r} has no rnn_xp configuration")
            config = json.loads(meta["rnn_xp"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    return config, arrays


def _build(config: dict[str, Any], params: dict[str, np.ndarray], like: Any) -> Recurrent:
    model = Recurrent(
        config["mode"],
        config["input_size"],
        config["hidden_size"],
        config["num_layers"],
        bias=config["bias"],
        batch_first=config["batch_first"],
        bidirectional=config["bidirectional"],
        dropout=config.get("dropout", 0.0),
        like=like,
        dtype=config["dtype"],
        seed=0,
    )
    model.load_state_dict(
        {k: asarray(model._xp, v, model._dtype, model._device) for k, v in params.items()}
    )
    return model


def load(path: str | os.PathLike, like: Any = None) -> Recurrent:
    """Read a model written by `save`; its parameters go to ``like``'s namespace and device."""
    config, arrays = _read(path)
    params = {k: v for k, v in arrays.items() if not k.startswith(EXTRA)}
    return _build(config, params, like)


def load_extra(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The extra arrays saved beside the model, without their ``extra.`` prefix."""
    _, arrays = _read(path)
    return {k[len(EXTRA) :]: v for k, v in arrays.items() if k.startswith(EXTRA)}


def infer_config(
    state: dict[str, np.ndarray], mode: str | None = None, batch_first: bool = False
) -> dict[str, Any]:
    """The configuration of a torch ``state_dict`` of an RNN, LSTM or GRU module.

    Everything follows from the keys and shapes except the nonlinearity of a
    plain RNN ('rnn_tanh' or 'rnn_relu', which must then be given as ``mode``)
    and ``batch_first``.
    """
    if "weight_ih_l0" not in state or "weight_hh_l0" not in state:
        raise ValueError("state_dict: expected torch RNN keys such as weight_ih_l0, weight_hh_l0")
    H = int(state["weight_hh_l0"].shape[1])
    G = int(state["weight_ih_l0"].shape[0]) // H
    inferred = {4: "lstm", 3: "gru"}.get(G)
    if G not in (1, 3, 4):
        raise ValueError(f"state_dict: weight_ih_l0 has {G}*H rows; expected 1, 3 or 4 gates")
    if mode is None:
        if inferred is None:
            raise ValueError(
                "mode: a plain RNN's state_dict does not say its nonlinearity; "
                "give --mode rnn_tanh or --mode rnn_relu"
            )
        mode = inferred
    if (
        mode not in MODES
        or (inferred is not None and mode != inferred)
        or (inferred is None and not mode.startswith("rnn"))
    ):
        raise ValueError(f"mode: {mode!r} does not match a state_dict with {G} gate(s)")
    num_layers = 1 + max(int(k.split("_l")[1].split("_")[0]) for k in state if "_l" in k)
    return {
        "format": FORMAT,
        "mode": mode,
        "input_size": int(state["weight_ih_l0"].shape[1]),
        "hidden_size": H,
        "num_layers": num_layers,
        "bidirectional": any(k.endswith("_reverse") for k in state),
        "nonlinearity": mode.removeprefix("rnn_") if mode.startswith("rnn") else None,
        "bias": "bias_ih_l0" in state,
        "batch_first": batch_first,
        "dropout": 0.0,
        "dtype": str(state["weight_ih_l0"].dtype),
    }


def load_torch(
    path: str | os.PathLike, mode: str | None = None, batch_first: bool = False, like: Any = None
) -> Recurrent:
    """A model from a torch ``state_dict`` file, read with ``torch.load(weights_only=True)``."""
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"state_dict: no such file {os.fspath(path)!r}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"state_dict: expected a dict of tensors in {os.fspath(path)!r}")
    state = {k: v.detach().cpu().numpy() for k, v in raw.items()}
    return _build(infer_config(state, mode, batch_first), state, like)
