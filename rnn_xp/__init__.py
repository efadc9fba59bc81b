"""rnn_xp: recurrent networks written once against the Python array API standard.

The same code runs on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict
arrays, and returns results in the caller's library, dtype and device.

Classes (the notebook's contract)
    RNN, RNNLayer
Pure functions (no hidden state; the classes wrap them)
    rnn_cell_forward, rnn_cell_backward, rnn_forward, rnn_backward
"""

from .elman import (
    RNN,
    RNNLayer,
    rnn_backward,
    rnn_cell_backward,
    rnn_cell_forward,
    rnn_forward,
)

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "RNNLayer",
    "__version__",
    "rnn_backward",
    "rnn_cell_backward",
    "rnn_cell_forward",
    "rnn_forward",
]
