"""torch interop: a `Recurrent` from a ``torch.nn.RNN``, ``LSTM`` or ``GRU`` module.

The other direction needs no code: `Recurrent.state_dict` holds torch's names
and layouts, so ``module.load_state_dict`` takes it (as torch tensors).
"""

from __future__ import annotations

from typing import Any

from ._backends import asarray, on_input_device
from .model import Recurrent

Array = Any

__all__ = ["from_torch"]


@on_input_device
def from_torch(module: Any, like: Array | None = None) -> Recurrent:
    """A `Recurrent` with the parameters of a ``torch.nn.RNN``, ``LSTM`` or ``GRU``.

    Parameters
    ----------
    module : torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU
        Any ``num_layers``, ``bidirectional``, ``nonlinearity``, ``bias``,
        ``batch_first``, ``dropout``, and LSTM projections (``proj_size``).
    like : array or None
        The parameters go into ``like``'s namespace and onto its device; NumPy
        when None. The module's dtype is kept.

    Returns
    -------
    Recurrent
        With the module's hyperparameters, parameters and training mode.
    """
    kinds = {"RNN": None, "LSTM": "lstm", "GRU": "gru"}
    name = type(module).__name__
    if name not in kinds or not hasattr(module, "_flat_weights_names"):
        raise TypeError(
            "module: expected a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU, got "
            f"{type(module).__module__}.{name}"
        )
    mode = kinds[name] or f"rnn_{module.nonlinearity}"
    if any(p.is_meta for p in module.parameters()):
        raise ValueError("module: its parameters are on the meta device and hold no values")
    dtype = str(module.weight_ih_l0.dtype).removeprefix("torch.")
    try:
        model = Recurrent._configured(
            mode,
            module.input_size,
            module.hidden_size,
            module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            bidirectional=module.bidirectional,
            dropout=module.dropout,
            like=like,
            dtype=dtype,
            proj_size=getattr(module, "proj_size", 0),
        )
    except TypeError as exc:
        if not str(exc).startswith("dtype:"):
            raise
        raise TypeError(
            f"module: its parameters are {dtype}, which like's library cannot hold here "
            f"({str(exc).removeprefix('dtype: ')}); convert the module (module.float()), or "
            "pass another like"
        ) from None
    # Through NumPy, which has no bfloat16: float32 holds every bfloat16 exactly.
    wide = {"bfloat16": "float32"}.get(dtype)
    model.load_state_dict(
        {
            n: asarray(
                model._xp,
                (p.detach().float() if wide else p.detach()).cpu().numpy(),
                model._dtype,
                model._device,
            )
            for n, p in module.named_parameters()
        }
    )
    return model.train(module.training)
