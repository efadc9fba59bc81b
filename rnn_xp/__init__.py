"""rnn_xp: recurrent networks written once against the Python array API standard.

The same code runs on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict
arrays, and returns results in the caller's library, dtype and device.

Cells and layers (stateful classes, the notebook's contract)
    RNN, RNNLayer, LSTM, LSTMLayer, GRU, GRULayer
Pure functions (no hidden state; the classes wrap them)
    rnn_cell_forward, rnn_cell_backward, rnn_forward, rnn_backward,
    lstm_cell_forward, lstm_cell_backward, lstm_forward, lstm_backward,
    gru_cell_forward, gru_cell_backward, gru_forward, gru_backward
Sequence model (stacked, bidirectional, masks, dropout), weights on disk, torch interop
    Recurrent, load (and Recurrent.save), from_torch
Your own cells
    cells (the protocol: Cell, Param, Outer; sequence_forward, sequence_backward,
    CellLayer), lstm_variants (projected, peephole and LayerNorm LSTMs built with it)
Modules
    optim (SGD, Adam, clip_by_global_norm), batch (run a saved model over a .npy file)

Importing rnn_xp imports NumPy and array-api-compat only: torch, JAX, Dask and CuPy
are imported where an array or a backend of theirs is first used.
"""

from . import batch, cells, lstm_variants, optim
from .elman import (
    RNN,
    RNNLayer,
    rnn_backward,
    rnn_cell_backward,
    rnn_cell_forward,
    rnn_forward,
)
from .gru import (
    GRU,
    GRULayer,
    gru_backward,
    gru_cell_backward,
    gru_cell_forward,
    gru_forward,
)
from .interop import from_torch
from .io import load
from .lstm import (
    LSTM,
    LSTMLayer,
    lstm_backward,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_forward,
)
from .model import MODES, Recurrent
from .onnx_import import from_onnx

__version__ = "0.2.0"

__all__ = [
    "GRU",
    "LSTM",
    "MODES",
    "RNN",
    "GRULayer",
    "LSTMLayer",
    "RNNLayer",
    "Recurrent",
    "__version__",
    "batch",
    "cells",
    "from_onnx",
    "from_torch",
    "gru_backward",
    "gru_cell_backward",
    "gru_cell_forward",
    "gru_forward",
    "load",
    "lstm_backward",
    "lstm_cell_backward",
    "lstm_cell_forward",
    "lstm_forward",
    "lstm_variants",
    "optim",
    "rnn_backward",
    "rnn_cell_backward",
    "rnn_cell_forward",
    "rnn_forward",
]
