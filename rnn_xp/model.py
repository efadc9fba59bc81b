"""A torch-like sequence model over any of the three cells: stacked, bidirectional,
with dropout between layers and variable-length sequences.

`Recurrent` keeps its parameters under torch's names and in torch's layout
(``weight_ih_l0`` is (gates*H, D), the transpose of the cells' ``Wx``), so
`from_torch` and `Recurrent.state_dict` map one to one onto ``torch.nn.RNN``,
``torch.nn.LSTM`` and ``torch.nn.GRU``. The time loop is the one every cell
shares (`rnn_xp._scan`); nothing here depends on the array library.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_numpy_array, to_device

from . import _checks, _chunks, _inputs, _mixed, _scan, _streaming, cells
from . import precision as _precision
from ._backends import (
    asarray,
    check_dtype,
    on_model_device,
    to_numpy,
    zeros,
)
from ._backends import dtype_name as _dtype_name
from ._layer import cast, result_dtype
from .elman import ElmanCell
from .gru import GRUCell
from .lstm import LSTMCell
from .lstm_variants import LayerNormLSTMCell, PeepholeLSTMCell, ProjectedLSTMCell

Array = Any

__all__ = ["MODES", "TORCH_MODES", "Recurrent"]

MODES: dict[str, Any] = {
    "rnn_tanh": ElmanCell("tanh"),
    "rnn_relu": ElmanCell("relu"),
    "lstm": LSTMCell(),
    "gru": GRUCell(),
    "lstm_peephole": PeepholeLSTMCell(),
    "lstm_layernorm": LayerNormLSTMCell(),
}
"""The cell behind each ``mode``: the fused kinds of `_scan`, or `rnn_xp.cells.Cell` ones."""

TORCH_MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")
"""The modes of torch's own modules (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``)."""


def _floating(xp: ModuleType, dtype: Any, dev: Any) -> Any:
    """The real floating dtype of ``xp`` that ``dtype`` (a name or a dtype) names."""
    resolved = getattr(xp, dtype, None) if isinstance(dtype, str) else dtype
    try:
        ok = resolved is not None and xp.isdtype(resolved, "real floating")
    except (TypeError, ValueError, AttributeError):  # a dtype of another library
        ok = False
    if not ok:
        raise TypeError(
            f"dtype: expected a real floating dtype of {xp.__name__}, such as 'float32', "
            f"got {dtype!r}"
        )
    check_dtype(xp, resolved, dev)
    return resolved


def _library(name: str, like: Any) -> tuple[ModuleType, Any]:
    """``(namespace, device)`` of the array ``like``; TypeError naming ``name`` otherwise."""
    try:
        return array_namespace(like), device(like)
    except TypeError:
        got = f"{type(like).__module__}.{type(like).__name__}"
        raise TypeError(
            f"{name}: expected an array of the library (and on the device) that should "
            f"hold the parameters, got {got}"
        ) from None


def _host(xp: ModuleType, a: Array) -> np.ndarray:
    """The values of ``a``, an array of ``xp`` on any device, as a NumPy array."""
    try:
        return to_numpy(a)
    except RuntimeError:
        # array-api-strict hands NumPy only arrays on its default (CPU) device.
        cpu = xp.__array_namespace_info__().default_device()
        return to_numpy(xp.asarray(a, device=cpu, copy=True))


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


class Recurrent:
    """A stack of recurrent layers, each optionally bidirectional, like ``torch.nn.RNN``.

    Parameters
    ----------
    mode : {'rnn_tanh', 'rnn_relu', 'lstm', 'gru', 'lstm_peephole', 'lstm_layernorm'} or Cell
        The cell of every layer: a built-in one by name (the last two are the
        peephole and layer-normalised LSTMs of `rnn_xp.lstm_variants`), or an
        instance of your own `rnn_xp.cells.Cell`.
    input_size : int
        D, the features of each step of the input.
    hidden_size : int
        H, the features of the state.
    num_layers : int, default 1
    bias : bool, default True
    batch_first : bool, default False
        If True, inputs and outputs are (N, T, features); else (T, N, features).
    bidirectional : bool, default False
    dropout : float, default 0
        Probability of zeroing each output of every layer but the last, in
        training mode. The array API has no random module, so a forward pass
        that applies dropout takes ``dropout_seed`` or ``dropout_masks``.
    seed : int or None
        Seed of the NumPy generator that draws the initial parameters.
    like : array or None
        The parameters are created in ``like``'s namespace and on its device;
        NumPy when None.
    dtype : str or dtype, default 'float32'
        Floating dtype of the parameters.
    proj_size : int, default 0
        For mode 'lstm', torch's projections: each layer's output and h are
        ``(o * tanh(c)) @ weight_hr.T``, P = ``proj_size`` wide (0 < P < H),
        with ``weight_hr_l{k}`` (P, H); c stays H wide.
    precision : {'bf16-mixed', '16-mixed'}, `rnn_xp.precision.Policy` or None
        A mixed-precision policy for every forward and backward (a call may
        give its own): the matrix products read bfloat16 or float16 operands,
        everything else is float32, and ``out`` comes back in the policy's
        output dtype. Needs float32 parameters. See `rnn_xp.precision`.

    Notes
    -----
    Parameters are drawn as in torch, ``U(-1/sqrt(H), 1/sqrt(H))``, one after
    the other in torch's order (for each layer and direction: ``weight_ih``,
    ``weight_hh``, ``bias_ih``, ``bias_hh``), from
    ``numpy.random.default_rng(seed)`` in float64, then rounded to ``dtype`` and
    moved to the target. So a seed gives the same parameters on every backend
    and device (up to that rounding); it does not reproduce torch's own draws.

    For modes 'rnn_tanh', 'rnn_relu' and 'lstm' the two biases only ever act as
    their sum, so their gradients are equal. For 'gru', ``bias_hh`` sits inside
    the reset gate's product and the two differ.
    """

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
        dropout: float = 0.0,
        *,
        seed: int | None = None,
        like: Array | None = None,
        dtype: Any = "float32",
        proj_size: int = 0,
        precision: Any = None,
    ) -> None:
        self._configure(
            mode,
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            bidirectional,
            dropout,
            like=like,
            dtype=dtype,
            proj_size=proj_size,
            precision=precision,
        )
        rng = _inputs.generator("seed", seed)
        k = 1 / np.sqrt(self.hidden_size)
        draws = {
            "uniform": lambda shape: rng.uniform(-k, k, shape),
            "ones": np.ones,
            "zeros": np.zeros,
        }
        self._params = {
            name: asarray(self._xp, draws[init](shape), self._dtype, self._device)
            for name, (shape, init) in self._specs().items()
        }

    @classmethod
    def _configured(cls, *args: Any, **kwargs: Any) -> Recurrent:
        """A model configured as ``Recurrent(*args, **kwargs)`` would be, with no parameters.

        For loaders: the configuration is validated and nothing is allocated;
        the caller then gives the parameters with `load_state_dict`, which
        checks them against the shapes the configuration fixes. A file that
        claims a huge ``hidden_size`` so costs nothing before that check.
        """
        model = cls.__new__(cls)
        model._configure(*args, **kwargs)
        model._params = {}
        return model

    def _configure(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
        dropout: float = 0.0,
        *,
        like: Array | None = None,
        dtype: Any = "float32",
        proj_size: int = 0,
        precision: Any = None,
    ) -> None:
        if isinstance(mode, cells.Cell):
            cell = mode
            mode = str(cell.kind)
            if mode in MODES and MODES[mode] != cell:
                raise ValueError(
                    f"mode: the cell's kind {mode!r} is the name of a built-in mode; give "
                    f"{type(cell).__name__} a kind of its own"
                )
        elif not isinstance(mode, str) or mode not in MODES:
            raise ValueError(
                f"mode: expected one of {', '.join(map(repr, MODES))} or an rnn_xp.cells.Cell, "
                f"got {mode!r}"
            )
        else:
            cell = MODES[mode]
        if isinstance(proj_size, bool) or not isinstance(proj_size, (int, np.integer)):
            raise ValueError(f"proj_size: expected a non-negative integer, got {proj_size!r}")
        if proj_size:
            if mode != "lstm":
                raise ValueError(f"proj_size: only mode 'lstm' has projections, got mode {mode!r}")
            if not 0 < proj_size < _positive("hidden_size", hidden_size):
                raise ValueError(
                    f"proj_size: expected 0 (none) or 0 < proj_size < hidden_size={hidden_size}, "
                    f"got {proj_size}"
                )
            cell = ProjectedLSTMCell(int(proj_size))
        self.proj_size = int(proj_size)
        number = isinstance(dropout, (int, float, np.floating, np.integer))
        if isinstance(dropout, bool) or not number or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.mode = mode
        # The time loop's cell: a fused kind of `_scan`, or a public cell's kernel.
        self.cell = cells.kernel(cell) if isinstance(cell, cells.Cell) else cell
        self.input_size = _positive("input_size", input_size)
        self.hidden_size = _positive("hidden_size", hidden_size)
        own = self.cell.cell if getattr(self.cell, "generic", False) else None
        self._own = own  # the public cell, or None for a fused kind
        # The width of each state array; the first is the output's, per direction.
        self._widths = (
            tuple(int(w) for w in own.state_sizes(self.hidden_size))
            if own is not None
            else (self.hidden_size,) * self.cell.n_states
        )
        self.num_layers = _positive("num_layers", num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.dropout = float(dropout)
        self.training = True
        self.grads: dict[str, Array] | None = None
        self.dh0: Array | None = None
        self.dc0: Array | None = None
        self._cache: dict | None = None
        # The last forward ran a Dask input one task per chunk (so kept nothing
        # for backward) although inference=False: backward says why it cannot run.
        self._chunked = False

        if like is None:
            import array_api_compat.numpy as xp

            self._xp, self._device = xp, "cpu"
        else:
            self._xp, self._device = _library("like", like)
        self._dtype = _floating(self._xp, dtype, self._device)
        self._precision = None
        self.precision = precision

    @property
    def precision(self) -> Any:
        """The model's mixed-precision policy (`rnn_xp.precision.Policy`), or None.

        Settable to a policy name, a `Policy` or None (``'32-true'`` is None);
        checked as ``Recurrent(..., precision=)`` checks it.
        """
        return self._precision

    @precision.setter
    def precision(self, value: Any) -> None:
        policy = _precision.policy(value)
        if policy is not None:
            self._check_policy(policy)
        self._precision = policy

    def _policy(self, precision: Any) -> Any:
        """The policy of a call: ``precision`` if given, else the model's; None for none.

        Checked before any work: the parameters must be float32 (the master
        copy) and the library able to run the policy (`rnn_xp._mixed`).
        """
        policy = self.precision if precision is None else _precision.policy(precision)
        if policy is not None:
            self._check_policy(policy)
        return policy

    def _check_policy(self, policy: Any) -> None:
        """`_precision.Policy` ``policy`` can run on this model, or one clear error."""
        if _dtype_name(self._dtype) != "float32":
            raise ValueError(
                f"precision: the policy {policy.name!r} keeps the parameters in float32, and "
                f"this model's are {_dtype_name(self._dtype)}; convert it first "
                "(model.astype('float32'))"
            )
        _mixed.namespace(self._xp, policy)

    def __repr__(self) -> str:
        first = repr(self.mode) if self._own is None or self.mode in MODES else repr(self._own)
        args = [first, str(self.input_size), str(self.hidden_size)]
        defaults = {
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "bidirectional": False,
            "dropout": 0.0,
            "proj_size": 0,
        }
        args += [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]
        policy = self.precision
        if policy is not None:
            default = policy.output == _precision.POLICIES[policy.name]
            args.append(f"precision={policy.name!r}" if default else f"precision={policy!r}")
        library = self._xp.__name__.removeprefix("array_api_compat.")
        args += [f"dtype={_dtype_name(self._dtype)}", f"library={library}"]
        args.append(f"device={self._device}")
        return f"{type(self).__name__}({', '.join(args)})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(xs, ...)`` is ``model.forward(xs, ...)``, as in torch."""
        return self.forward(*args, **kwargs)

    def astype(self, dtype: Any) -> Recurrent:
        """A copy of the model whose parameters are ``dtype`` (torch's ``module.to(dtype)``).

        The copy computes in ``dtype`` (or wider, if its inputs are); it shares
        no state with this model. The same as ``model.to(dtype=dtype)``.
        """
        return self.to(dtype=dtype)

    @on_model_device
    def to(self, like: Array | None = None, dtype: Any = None) -> Recurrent:
        """A copy of the model on ``like``'s library and device, and/or in ``dtype``.

        Parameters
        ----------
        like : array, optional
            The copy's parameters become arrays of this array's library, on its
            device (its shape and dtype do not matter). The model's own when None.
        dtype : str or dtype, optional
            Real floating dtype of the copy: a name such as ``'float64'``, or a
            dtype of the target library. The model's own when None.

        Returns
        -------
        Recurrent
            The same configuration and training mode, with parameters that are
            new arrays (copies even where nothing changes), no gradients and
            nothing kept from a forward.

        Notes
        -----
        The copy keeps the model's precision policy, so it must be float32 and
        of a library that can run the policy (else ValueError or TypeError).
        Within one library the copy is that library's own ``astype`` and
        ``to_device``, which autograd follows (a torch leaf that requires grad
        gives a copy that does too); between libraries the values go through
        host memory as NumPy arrays, which is exact (bfloat16 through float32).
        """
        xp, dev = (self._xp, self._device) if like is None else _library("like", like)
        if dtype is not None:
            target = _floating(xp, dtype, dev)
        else:
            name = _dtype_name(self._dtype)
            try:
                target = _floating(xp, name, dev)
            except TypeError as exc:
                raise TypeError(
                    f"like: the model is {name}, which {xp.__name__} cannot hold here "
                    f"({str(exc).removeprefix('dtype: ')}); pass dtype= too"
                ) from None
        if self.precision is not None:  # the copy keeps the policy: it must be able to run it
            if _dtype_name(target) != "float32":
                raise ValueError(
                    f"dtype: the model runs the precision policy {self.precision.name!r}, which "
                    f"keeps the parameters in float32, not {_dtype_name(target)}; set "
                    "model.precision = None first for a copy without it"
                )
            _mixed.namespace(xp, self.precision)
        return self._copy(xp, dev, target)

    def _copy(self, xp: ModuleType, dev: Any, dtype: Any) -> Recurrent:
        """A copy whose parameters are new ``dtype`` arrays of ``xp`` on ``dev``; no state."""
        twin = copy.copy(self)
        twin._xp, twin._device, twin._dtype = xp, dev, dtype
        if xp is self._xp:
            here = dev == self._device
            # A move to another device is a copy by itself.
            params = {k: xp.astype(v, dtype, copy=here) for k, v in self._params.items()}
            twin._params = params if here else {k: to_device(v, dev) for k, v in params.items()}
        else:
            # Through NumPy, which has no bfloat16: float32 holds every bfloat16 exactly.
            wide = _dtype_name(self._dtype) == "bfloat16"
            twin._params = {
                k: asarray(
                    xp,
                    _host(self._xp, self._xp.astype(v, self._xp.float32) if wide else v),
                    dtype,
                    dev,
                )
                for k, v in self._params.items()
            }
        twin.grads, twin.dh0, twin.dc0, twin._cache = None, None, None, None
        twin._chunked = False
        return twin

    # -- parameters ----------------------------------------------------------

    def _names(self, layer: int, direction: int) -> tuple[str, str, str, str]:
        suffix = _suffix(layer, direction)
        return tuple(
            f"{kind}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def _layer_specs(self, layer: int) -> dict[str, cells.Param]:
        """One layer's parameters (each direction has its own) by base name, in saving order."""
        D = self.input_size if layer == 0 else self._widths[0] * self.num_directions
        if self._own is not None:
            return cells.specs(self._own, D, self.hidden_size, self.bias)
        G, H = self.cell.gates, self.hidden_size
        specs = {"weight_ih": cells.Param((G * H, D)), "weight_hh": cells.Param((G * H, H))}
        if self.bias:
            specs["bias_ih"] = specs["bias_hh"] = cells.Param((G * H,), bias=True)
        return specs

    def _specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every parameter's name, shape and initialisation, in torch's order."""
        out = {}
        for layer in range(self.num_layers):
            specs = self._layer_specs(layer)
            for direction in range(self.num_directions):
                suffix = _suffix(layer, direction)
                out.update({k + suffix: (p.shape, p.init) for k, p in specs.items()})
        return out

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """torch's parameter names and shapes, in torch's order."""
        return {name: shape for name, (shape, _) in self._specs().items()}

    @on_model_device
    def state_dict(self) -> dict[str, Array]:
        """The parameters by torch's names, as arrays of the model's namespace."""
        return dict(self._params)

    @on_model_device
    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Replace the parameters; ``state`` must have exactly this model's keys and shapes.

        Every array must be real floating and either of the model's library, on
        its device, or a NumPy array, which is copied there. Each takes the
        model's dtype, as torch's ``load_state_dict`` copies into its
        parameters: a float64 array given to a float32 model is rounded, so the
        model always computes in its own dtype. An array already of the model's
        library and dtype is used as given (a torch leaf that requires grad, a
        JAX tracer). Nothing is replaced unless every array passes.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping of names to arrays, got {type(state)}")
        shapes = self._shapes()
        if set(state) != set(shapes):
            missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
            raise ValueError(f"state: missing keys {missing}, unexpected keys {extra}")
        params = {}
        for name, shape in shapes.items():
            a = state[name]
            xp, _, dev = _checks.common(**{name: a})
            if tuple(a.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(a.shape)}")
            if xp is not self._xp:
                if not is_numpy_array(a):
                    raise TypeError(
                        f"{name}: expected an array of the model's library "
                        f"({self._xp.__name__}) or a NumPy array, "
                        f"got {type(a).__module__}.{type(a).__name__}"
                    )
                params[name] = asarray(self._xp, a, self._dtype, self._device)
                continue
            if dev is not None and self._device is not None and dev != self._device:
                raise ValueError(
                    f"{name}: expected an array on the model's device ({self._device}), "
                    f"got one on {dev}"
                )
            params[name] = a if a.dtype == self._dtype else xp.astype(a, self._dtype)
        self._params = params

    def save(self, path: Any, extra: Mapping[str, Array] | None = None) -> None:
        """Write the model to ``path`` (.npz or .safetensors); see `rnn_xp.io.save`."""
        from ._format import save  # the writing side of rnn_xp.io, which imports no model

        save(self, path, dict(extra or {}))

    def to_onnx(
        self,
        path: Any,
        opset: int | None = None,
        *,
        lengths: bool = False,
        initial_state: bool = False,
    ) -> None:
        """Write the model as an ONNX graph of ONNX's RNN, LSTM and GRU operators.

        Inputs ``xs`` (symbolic N and T), with ``lengths=True`` ``lengths``
        (int64, (N,)), with ``initial_state=True`` ``h0`` (and ``c0``);
        outputs ``out``, ``h_n`` (and ``c_n``), in the shapes and layout of
        `forward`, float32. ``opset`` defaults to
        `rnn_xp.onnx_graph.DEFAULT_OPSET`. A cell of your own, the LayerNorm
        LSTM and ``proj_size`` raise ValueError: ONNX has no operator for them.
        See `rnn_xp.onnx_graph` (extra ``onnx``).
        """
        from .onnx_graph import export

        export(self, path, opset, lengths, initial_state)

    def train(self, mode: bool = True) -> Recurrent:
        """Set training mode (dropout on); return self."""
        self.training = bool(mode)
        return self

    def eval(self) -> Recurrent:
        """Set evaluation mode (dropout off); return self."""
        return self.train(False)

    def _weights(self, xp: ModuleType, dtype: Any, layer: int, direction: int):
        """``(Wx, Wh, bx, bh)`` of one layer and direction, as the cells take them.

        For a public cell, ``Wh`` is the dict of its own parameters and ``bh`` None.
        """
        if self._own is not None:
            suffix = _suffix(layer, direction)
            names = [k for k in self._layer_specs(layer)]
            arrays = cast(xp, dtype, *(self._params[k + suffix] for k in names))
            Wx, bx, own = cells.split(self._own, dict(zip(names, arrays)))
            if isinstance(xp, _mixed.Namespace):  # it only enters the input projection
                Wx = xp.operand(Wx)
            return Wx, own, bx, None
        w_ih, w_hh, b_ih, b_hh = cast(
            xp, dtype, *(self._params.get(n) for n in self._names(layer, direction))
        )
        if isinstance(xp, _mixed.Namespace):  # the weights only ever enter products
            w_ih, w_hh = xp.operand(w_ih), xp.operand(w_hh)
        if b_ih is None or isinstance(self.cell, GRUCell):
            return w_ih.T, w_hh.T, b_ih, b_hh
        # Elman and LSTM add both biases to the same pre-activation: fold them.
        return w_ih.T, w_hh.T, b_ih + b_hh, None

    # -- forward ---------------------------------------------------------------

    def _batch_major(self, xp: ModuleType, a: Array) -> Array:
        return a if self.batch_first else xp.permute_dims(a, (1, 0, 2))

    @on_model_device
    def forward(
        self,
        xs: Array | Sequence[Array],
        h0: Array | tuple[Array, Array] | None = None,
        lengths: Array | Sequence[int] | None = None,
        mask: Array | None = None,
        *,
        dropout_seed: int | None = None,
        dropout_masks: list[Array] | None = None,
        inference: bool = False,
        precision: Any = None,
    ) -> tuple[Array | list[Array], Array | tuple[Array, Array]]:
        """Run the model; return ``(out, h_n)``, or ``(out, (h_n, c_n))`` for LSTM.

        ``model(xs, ...)`` is the same call.

        Parameters
        ----------
        xs : array, shape (T, N, D), or (N, T, D) if ``batch_first``; or a list
            A list (or tuple) of N arrays of shapes (T_i, D), sequences of
            different lengths of one library, device and dtype, as Chainer's
            ``NStepLSTM`` takes them: ``out`` is then a list of arrays
            (T_i, num_directions * H), ``h_n`` as usual, and ``backward`` takes
            a list of such arrays. ``batch_first`` does not apply to the items.
            The sequences are padded into one array and run with their
            lengths; give neither ``lengths`` nor ``mask`` with a list.
        h0 : array, shape (num_layers * num_directions, N, H), optional
            Initial states (zeros when omitted); for LSTM a pair ``(h0, c0)``.
            Here and below, H is each state's width: with ``proj_size`` h, and
            so ``out``, is ``proj_size`` wide and c H wide; a cell of your own
            has the widths of its ``state_sizes``.
        lengths : integer array, shape (N,), or a sequence of N ints, optional
            Lengths of right-padded sequences, each in [1, T], as with torch's
            ``pack_padded_sequence``: outputs at padded steps are zero, ``h_n``
            is each sequence's state at its last valid step, and the reverse
            direction starts at each sequence's own last step. A list or tuple
            of Python ints becomes an integer array of ``xs``' library and device.
        mask : bool array, shape (N, T), optional
            Keras' meaning: a step where ``mask`` is False carries the state
            through unchanged and outputs zeros. Left-padded and gappy masks
            both work. Give ``lengths`` or ``mask``, not both.
        dropout_seed : int, optional
            Seed for the dropout masks between layers (NumPy generator, masks
            moved to the input's device).
        dropout_masks : list of bool arrays, optional
            Instead of a seed, the keep-masks themselves: ``num_layers - 1``
            arrays shaped like a layer's output, (T, N, num_directions * H) or
            (N, T, ...) if ``batch_first`` (T the longest sequence, for a list
            ``xs``). Kept values are scaled by 1/(1-p).
        inference : bool, default False
            Keep nothing for `backward` (which then raises); peak memory beyond
            the output is one layer's input projection plus O(N*H) on NumPy/CuPy.
        precision : {'bf16-mixed', '16-mixed', '32-true'}, `rnn_xp.precision.Policy`, optional
            The mixed-precision policy of this call (and of the `backward`
            after it); the model's own (``Recurrent(..., precision=)``) when
            None, and no policy with '32-true'. Under a policy the products read
            the policy's format, the computation is float32 whatever the
            input's dtype, ``out`` comes back in the policy's output dtype and
            ``h_n`` (and ``c_n``) in float32.

        Returns
        -------
        out : array, shape (T, N, num_directions * H), or (N, T, ...) if ``batch_first``
            For a list ``xs``, a list of arrays (T_i, num_directions * H).
        h_n : array, shape (num_layers * num_directions, N, H); for LSTM ``(h_n, c_n)``

        Notes
        -----
        A Dask ``xs`` given to a model whose parameters are not Dask arrays
        (NumPy ones, say) runs one task per batch chunk, each with this same
        method on the chunk's library: in evaluation, as with
        ``inference=True``, so `backward` then raises. Dropout in training mode
        cannot run so and raises: call `eval` first. To train on Dask arrays,
        move the model there (``model.to(like=xs)``); its forward then runs op
        by op, unless ``inference=True``.
        """
        policy = self._policy(precision)
        if isinstance(xs, (list, tuple)):
            return self._forward_list(
                xs, h0, lengths, mask, dropout_seed, dropout_masks, inference, policy
            )
        known = None
        if isinstance(lengths, (list, tuple)):
            known = _inputs.python_lengths(lengths)
            xp, _, dev = _checks.common_chunked(xs=xs)
            lengths = asarray(xp, np.asarray(known, dtype=np.int64), None, dev)
        return self._forward(
            xs, h0, lengths, mask, known, dropout_seed, dropout_masks, inference, policy
        )

    def _forward_list(
        self, seqs, h0, lengths, mask, dropout_seed, dropout_masks, inference, policy
    ):
        """`forward` of a list of sequences (T_i, D): padded, run with their lengths, split."""
        for name, given in (("lengths", lengths), ("mask", mask)):
            if given is not None:
                raise ValueError(
                    f"{name}: a list of sequences gives its own lengths; pass {name} with one "
                    "padded array instead"
                )
        xp, dev, known, xs = _inputs.padded("xs", seqs, "D", self.input_size, self.batch_first)
        lengths = asarray(xp, np.asarray(known, dtype=np.int64), None, dev)
        out, h_n = self._forward(
            xs, h0, lengths, None, known, dropout_seed, dropout_masks, inference, policy
        )
        if self._cache is not None:
            self._cache["list"] = known
        return _inputs.split(xp, out, known, self.batch_first), h_n

    def _forward(
        self, xs, h0, lengths, mask, known, dropout_seed, dropout_masks, inference, policy
    ):
        """`forward` of one array; ``known``: the lengths as Python ints, if they were.

        ``policy``: the call's `rnn_xp.precision.Policy` (checked), or None.
        """
        lstm = self.cell.n_states == 2
        h0, c0 = self._split_state("h0", h0, lstm)
        dropout = self.training and self.dropout > 0 and self.num_layers > 1
        if inference and not dropout:
            try:  # Dask: each batch chunk runs this same method where it lives
                return self._forward_on_chunks(
                    xs, h0, c0, lengths, mask, known, lstm, False, policy
                )
            except NotImplementedError:
                pass
        first = self._names(0, 0)[0]
        try:
            xp, dtype, dev = _checks.common(xs=xs, h0=h0, c0=c0, **{first: self._params[first]})
        except TypeError:
            # Only on failure: an input of another library than the model. A Dask
            # one runs one task per chunk (without backward); for any other, say
            # so (the message would otherwise blame the parameter).
            if _checks.common_chunked(xs=xs)[0] is not self._xp:
                try:
                    result = self._forward_on_chunks(
                        xs, h0, c0, lengths, mask, known, lstm, dropout, policy
                    )
                except NotImplementedError:
                    pass
                else:
                    self._chunked = not inference
                    return result
            if _checks.common(xs=xs, h0=h0, c0=c0)[0] is not self._xp:
                raise TypeError(
                    f"xs: expected an array of the model's library ({self._xp.__name__}), got "
                    f"{type(xs).__module__}.{type(xs).__name__}; create or load the model with "
                    "like= an array of the input's library and device"
                ) from None
            raise
        N, T, steps = self._check_inputs(xp, dev, xs, h0, c0, lengths, mask, known)
        # Under a policy the loop computes in float32 with the policy's products.
        run = xp if policy is None else _mixed.namespace(xp, policy)
        if policy is not None:
            dtype = xp.float32
        keep = self._dropout_masks(xp, dtype, dev, N, T, dropout_seed, dropout_masks)

        x, h0, c0 = cast(xp, dtype, self._batch_major(xp, xs), h0, c0)
        tapes, h_n, c_n = {}, [], []
        given = (h0, c0) if lstm else (h0,)
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                i = layer * self.num_directions + direction
                state0 = tuple(
                    zeros(xp, (N, w), dtype, dev) if s is None else s[i, ...]
                    for s, w in zip(given, self._widths)
                )
                Wx, Wh, bx, bh = self._weights(run, dtype, layer, direction)
                out, state_n, tapes[i] = _scan.forward(
                    run,
                    self.cell,
                    x,
                    Wx,
                    Wh,
                    bx,
                    bh,
                    state0,
                    steps,
                    direction == 1,
                    not inference,
                    zero_state=all(s is None for s in given),
                )
                outs.append(out)
                h_n.append(state_n[0])
                c_n.extend(state_n[1:])
            x = outs[0] if len(outs) == 1 else xp.concat(outs, axis=-1)
            if keep is not None and layer < self.num_layers - 1:
                x = x * keep[layer]

        self._cache = (
            None
            if inference
            else {
                "tapes": tapes,
                "keep": keep,
                "xs": xs,
                "N": N,
                "T": T,
                "dtype": dtype,
                "run": run,
            }
        )
        self._chunked = False
        out = self._batch_major(xp, x)
        if policy is not None:
            out = cast(xp, getattr(xp, policy.output), out)[0]
        h_n = xp.stack(h_n, axis=0)
        return (out, (h_n, xp.stack(c_n, axis=0))) if lstm else (out, h_n)

    def _check_inputs(self, xp, dev, xs, h0, c0, lengths, mask, known) -> tuple[int, int, Any]:
        """Check the shapes of a forward's arrays; return ``(N, T, steps)``.

        ``steps`` is the (N, T) bool mask of valid steps, or None (see `_step_mask`).
        """
        S = self.num_layers * self.num_directions
        _checks.check_shape(
            "xs",
            xs,
            [("N", None), ("T", None), ("D", self.input_size)]
            if self.batch_first
            else [("T", None), ("N", None), ("D", self.input_size)],
            "with batch_first" if self.batch_first else "without batch_first",
        )
        N, T = (xs.shape[0], xs.shape[1]) if self.batch_first else (xs.shape[1], xs.shape[0])
        if T < 1:
            raise ValueError(f"xs: expected at least one time step, got shape {tuple(xs.shape)}")
        for (name, s), (label, w) in zip((("h0", h0), ("c0", c0)), self._state_labels()):
            if s is not None:
                _checks.check_shape(
                    name, s, [("num_layers*num_directions", S), ("N", N), (label, w)], ""
                )
        return N, T, _inputs.step_mask(xp, dev, N, T, lengths, mask, known)

    def _forward_on_chunks(self, xs, h0, c0, lengths, mask, known, lstm, dropout, policy):
        """`forward` of a Dask ``xs``, one task per batch chunk; NotImplementedError otherwise.

        Keeps nothing for backward. ``dropout``: training mode would apply it,
        which tasks cannot; refused once ``xs`` is known to be a Dask array.
        """
        axis = 0 if self.batch_first else 1
        F, S = self.num_directions * self._widths[0], self.num_layers * self.num_directions
        light = copy.copy(self)  # what each task receives: parameters, no cache
        light._cache, light.grads, light.dh0, light.dc0 = None, None, None, None
        light.precision = policy  # the call's, checked

        def outputs():
            # Every check of the forward, on the whole Dask arrays, before the
            # tasks (a task would report its chunk's sizes): one small compute
            # reads the lengths' range.
            if dropout:
                raise TypeError(
                    "xs: a Dask array given to a model of another library runs one task per "
                    "chunk, for inference only, and cannot apply the dropout of training mode "
                    f"(dropout={self.dropout}): call model.eval() first; to train on Dask "
                    "arrays, move the model there (model.to(like=xs))"
                )
            xp, _, dev = _checks.common_chunked(xs=xs, h0=h0, c0=c0)
            _, T, _ = self._check_inputs(xp, dev, xs, h0, c0, lengths, mask, known)
            if policy is not None:  # each chunk runs it on the chunks' library
                _mixed.namespace(array_namespace(xs._meta), policy)
            dtype = result_dtype(xs, self._params[self._names(0, 0)[0]], h0, c0)
            if policy is not None:  # the policy's output; the state float32
                dtype = np.dtype("float32")
            out_dtype = dtype if policy is None else np.dtype(policy.output)
            out = [(axis, (None, T, F) if self.batch_first else (T, None, F), out_dtype)]
            return out + [(1, (S, None, w), dtype) for w in self._widths]

        out, *states = _chunks.on_dask_chunks(
            _model_chunk,
            {
                "xs": (xs, axis),
                "h0": (h0, 1),
                "c0": (c0, 1),
                "lengths": (lengths, 0),
                "mask": (mask, 0),
            },
            outputs,
            {"model": light},
        )
        self._cache, self._chunked = None, False
        return out, (tuple(states) if lstm else states[0])

    def _on(self, xp: ModuleType, dev: Any) -> Recurrent:
        """A copy whose parameters are arrays of ``xp`` on ``dev`` (no copy if already)."""
        if xp is self._xp:
            return self
        return self._copy(xp, dev, getattr(xp, _dtype_name(self._dtype)))

    def _state_labels(self) -> list[tuple[str, int]]:
        """How each state's last axis is named in messages, and its width."""
        if self.proj_size:
            return list(zip(("proj_size", "H"), self._widths))
        names = self._own.state_names if self._own is not None else ("h", "c")
        return [
            ("H" if w == self.hidden_size else f"width of {n}", w)
            for n, w in zip(names, self._widths)
        ]

    def _split_state(self, name: str, state: Any, lstm: bool) -> tuple[Array | None, Array | None]:
        if state is None:
            return None, None
        if lstm:
            if not (isinstance(state, tuple) and len(state) == 2):
                raise TypeError(
                    f"{name}: expected a pair (h, c) for mode {self.mode!r}, got "
                    f"{type(state).__name__}"
                )
            return state
        if isinstance(state, tuple):
            raise TypeError(f"{name}: expected one array for mode {self.mode!r}, got a tuple")
        return state, None

    def _dropout_masks(self, xp, dtype, dev, N, T, seed, masks) -> list[Array] | None:
        """Scaled keep-masks, batch-major, one per layer boundary; None when off."""
        if not (self.training and self.dropout > 0 and self.num_layers > 1):
            return None
        F = self.num_directions * self._widths[0]
        return _inputs.dropout_masks(
            xp,
            dtype,
            dev,
            (N, T, F),
            self.dropout,
            self.num_layers - 1,
            self.batch_first,
            seed,
            masks,
        )

    # -- backward --------------------------------------------------------------

    def step(
        self, x_t: Array, state: Array | tuple[Array, Array] | None = None
    ) -> tuple[Array, Array | tuple[Array, Array]]:
        """One time step of every layer, for online inference: ``(y_t, new_state)``.

        ``x_t`` is (N, D); ``state`` is None (zeros) or what the last step
        returned, laid out as `forward`'s ``h0`` (for LSTM a pair ``(h, c)``).
        ``y_t`` (N, H) is the last layer's output. Unidirectional models only;
        no dropout applies (call `eval` first on a model that has some). See
        `rnn_xp._streaming.step`, which enters the model's device where it
        needs to (its NumPy path needs no entry: streaming lives on per-call cost).
        """
        return _streaming.step(self, x_t, state)

    @on_model_device
    def backward(
        self, dout: Array | Sequence[Array], dh_n: Array | tuple | None = None
    ) -> Array | list[Array]:
        """Backpropagate through the last `forward`; return ``dxs``.

        Parameters
        ----------
        dout : array, the shape of ``out``
            Gradient with respect to the output. After a forward of a list of
            sequences, a list of arrays (T_i, num_directions * H), and ``dxs``
            is then a list of arrays (T_i, D).
        dh_n : array, the shape of ``h_n``, optional
            Gradient with respect to ``h_n`` (for LSTM a pair ``(dh_n, dc_n)``,
            either of which may be None); zero when omitted.

        Sets ``grads``, a dict of gradients by torch's parameter names and
        shapes, ``dh0`` (and ``dc0`` for LSTM), the gradients with respect to
        the initial states, shape (num_layers * num_directions, N, H).
        """
        if self._cache is None:
            if self._chunked:
                raise RuntimeError(
                    "Recurrent.backward: call forward first (with inference=False); the last "
                    "one ran its Dask input one task per chunk, for inference, and kept nothing "
                    "for backward: to train on Dask arrays, move the model there first "
                    "(model = model.to(like=xs))"
                )
            raise RuntimeError("Recurrent.backward: call forward first (with inference=False)")
        known = self._cache.get("list")
        if isinstance(dout, (list, tuple)):
            if known is None:
                raise TypeError(
                    "dout: expected one array, as the forward took one; a list answers a "
                    "forward of a list of sequences"
                )
            F = self.num_directions * self._widths[0]
            xp, _, _, padded = _inputs.padded("dout", dout, "F", F, self.batch_first, known)
            return _inputs.split(xp, self._backward(padded, dh_n), known, self.batch_first)
        if known is not None:
            got = f"{type(dout).__module__}.{type(dout).__name__}"
            raise TypeError(
                f"dout: the forward took a list of sequences; expected a list of {len(known)} "
                f"arrays (T_i, num_directions*H), got {got}"
            )
        return self._backward(dout, dh_n)

    def _backward(self, dout: Array, dh_n: Array | tuple | None) -> Array:
        c = self._cache
        lstm = self.cell.n_states == 2
        dh_n, dc_n = self._split_state("dh_n", dh_n, lstm)
        xp, _, _ = _checks.common(dout=dout, dh_n=dh_n, dc_n=dc_n, xs=c["xs"])
        N, T = c["N"], c["T"]
        H = self._widths[0]  # of the output, per direction
        F = self.num_directions * H
        S = self.num_layers * self.num_directions
        out_shape = (
            [("N", N), ("T", T), ("F", F)] if self.batch_first else [("T", T), ("N", N), ("F", F)]
        )
        _checks.check_shape("dout", dout, out_shape, "to match the forward's output")
        for (name, s), (label, w) in zip((("dh_n", dh_n), ("dc_n", dc_n)), self._state_labels()):
            if s is not None:
                _checks.check_shape(
                    name, s, [("num_layers*num_directions", S), ("N", N), (label, w)]
                )
        dout, dh_n, dc_n = cast(xp, c["dtype"], dout, dh_n, dc_n)

        grads, dh0, dc0 = {}, [None] * S, [None] * S
        d = self._batch_major(xp, dout)
        for layer in reversed(range(self.num_layers)):
            if c["keep"] is not None and layer < self.num_layers - 1:
                d = d * c["keep"][layer]
            dx = None
            for direction in range(self.num_directions):
                i = layer * self.num_directions + direction
                dstate_n = tuple(
                    None if s is None else s[i, ...] for s in ((dh_n, dc_n) if lstm else (dh_n,))
                )
                d_dir = d[:, :, direction * H : (direction + 1) * H]
                dxs, dstate0, dWx, dWh, dbx, dbh = _scan.backward(
                    c["run"], self.cell, c["tapes"][i], d_dir, dstate_n
                )
                dx = dxs if dx is None else dx + dxs
                dh0[i] = dstate0[0]
                if lstm:
                    dc0[i] = dstate0[1]
                if self._own is not None:
                    suffix = _suffix(layer, direction)
                    w, b = self._own.projection
                    grads.update({k + suffix: g for k, g in dWh.items()})
                    grads[w + suffix] = dWx.T
                    if b is not None and b + suffix in self._params:
                        grads[b + suffix] = dbx
                    continue
                w_ih, w_hh, b_ih, b_hh = self._names(layer, direction)
                grads[w_ih], grads[w_hh] = dWx.T, dWh.T
                if self.bias:
                    grads[b_ih], grads[b_hh] = dbx, (dbx if dbh is None else dbh)
            d = dx

        self.grads = {
            name: g
            if g.dtype == self._params[name].dtype
            else xp.astype(g, self._params[name].dtype)
            for name, g in ((n, grads[n]) for n in self._params)
        }
        self.dh0 = xp.stack(dh0, axis=0)
        self.dc0 = xp.stack(dc0, axis=0) if lstm else None
        dxs = self._batch_major(xp, d)
        return dxs if dxs.dtype == c["xs"].dtype else xp.astype(dxs, c["xs"].dtype)


def _suffix(layer: int, direction: int) -> str:
    """What torch appends to a parameter's name: ``_l0``, ``_l1_reverse``."""
    return f"_l{layer}" + ("_reverse" if direction else "")


def _model_chunk(xs, model, h0=None, c0=None, lengths=None, mask=None):
    """One batch chunk of a Dask input, run by the same `Recurrent.forward`."""
    xp, dev = array_namespace(xs), device(xs)
    # NumPy parameters move to a GPU worker's device once, not once per chunk.
    m = model if xp is model._xp else _chunks.resident(model, dev, lambda: model._on(xp, dev))
    state = (h0, c0) if h0 is not None and c0 is not None else h0
    out, h_n = m.forward(xs, state, lengths, mask, inference=True)
    return (out, *h_n) if isinstance(h_n, tuple) else (out, h_n)
