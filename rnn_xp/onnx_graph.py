"""ONNX export: a `Recurrent` as a graph of ONNX's own RNN, LSTM and GRU operators.

rnn_xp knows its models exactly, so it writes the graph directly, with no
tracing: one ONNX recurrent node per layer (both directions in one node), and
the glue between layers. ``xs`` has symbolic batch and time dimensions, so the
file runs any N and T; ``lengths`` becomes the operators' ``sequence_lens``.

The mappings, each checked by running the file in ONNX Runtime against
`Recurrent.forward` (``tests/test_onnx.py``):

* **Gate order.** ONNX's LSTM stacks its gates i, o, f, c; torch's (and
  rnn_xp's) are i, f, g, o: ONNX block k is torch block ``(0, 3, 1, 2)[k]``.
  ONNX's GRU stacks z, r, h; torch's r, z, n: ``(1, 0, 2)``. Elman has one.
* **Weights.** ``W`` [dirs, G*H, D] is ``weight_ih`` with its gate blocks
  reordered, ``R`` [dirs, G*H, H] ``weight_hh``, and ``B`` [dirs, 2*G*H] is
  ``bias_ih`` then ``bias_hh``, each reordered: ONNX keeps the two biases
  apart (``Wb``, ``Rb``), as torch does. Without bias, ``B`` is left out
  (zeros).
* **GRU.** ``linear_before_reset=1`` is torch's formulation,
  ``n = tanh(W_n x + b_in + r * (R_n h + b_hn))``.
* **Elman.** ``activations`` is ``["Tanh"]`` or ``["Relu"]``, per direction.
* **Peephole LSTM** (``"lstm_peephole"``): ONNX's ``P`` [dirs, 3H] is
  ``[P_i, P_o, P_f]``, from c_{t-1} into i and f and from c_t into o, exactly
  `rnn_xp.lstm_variants.PeepholeLSTMCell`'s ``weight_ci``, ``weight_co``,
  ``weight_cf``.
* **Layout.** ``Y`` is [T, dirs, N, H]: a Transpose to [T, N, dirs, H] and a
  Reshape to [T, N, dirs*H] make the next layer's input and ``out``.
  ``Y_h`` (``Y_c``) is [dirs, N, H]; the layers' are concatenated into ``h_n``
  [layers*dirs, N, H] in torch's order. For ``batch_first`` the graph
  transposes ``xs`` and ``out``: ONNX's ``layout=1`` would be shorter, but
  ONNX Runtime's CPU kernels reject it.
* **Initial states.** ``h0`` (``c0``) [layers*dirs, N, H] are sliced per layer
  into ``initial_h`` (``initial_c``).

The graph is float32 (the dtype ONNX Runtime's CPU recurrent kernels take):
a model of another dtype is exported rounded to float32. It is the model in
evaluation: dropout between layers does not apply.

What ONNX's operators cannot express is refused with a `ValueError` that
names the reason, before any file is touched: a cell of your own, the
LayerNorm LSTM, and LSTM projections (``proj_size``). Reading files back is
`rnn_xp.onnx_import`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._backends import to_numpy
from ._imports import import_library

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "export"]

DEFAULT_OPSET = 17
"""The opset written when none is asked for: ONNX Runtime has run it since 1.11."""
MIN_OPSET = 14
"""The oldest opset accepted: 14 gave the recurrent operators their current form."""

_OPS = {
    "rnn_tanh": "RNN",
    "rnn_relu": "RNN",
    "lstm": "LSTM",
    "lstm_peephole": "LSTM",
    "gru": "GRU",
}
_ORDER = {"RNN": (0,), "LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2)}  # ONNX block k <- torch block


def _onnx() -> Any:
    return import_library("onnx", "ONNX (the onnx package)")


def _check(model: Any, opset: Any) -> int:
    """The opset to write; ValueError for a model or opset that cannot be exported."""
    if model._own is not None and model.mode not in _OPS:
        raise ValueError(
            f"model: ONNX has no operator for mode {model.mode!r} (a cell of your own, or the "
            "LayerNorm LSTM); only 'rnn_tanh', 'rnn_relu', 'lstm', 'gru' and 'lstm_peephole' "
            "are exportable"
        )
    if model.proj_size:
        raise ValueError(
            f"model: ONNX's LSTM has no projections (proj_size={model.proj_size}); only "
            "models without proj_size are exportable"
        )
    onnx = _onnx()
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        return min(DEFAULT_OPSET, newest)
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise ValueError(f"opset: expected an integer, got {opset!r}")
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset: expected {MIN_OPSET} to {newest} (this onnx {onnx.__version__}), got {opset}"
        )
    return int(opset)


def _blocks(a: np.ndarray, op: str, H: int) -> np.ndarray:
    """``a``'s gate blocks of H rows (the first axis) in ONNX's order."""
    return np.concatenate([a[k * H : (k + 1) * H] for k in _ORDER[op]], axis=0)


def build(model: Any, opset: Any = None, lengths: bool = False, states: bool = False) -> Any:
    """The `onnx.ModelProto` of ``model`` (checked by ``onnx.checker``, full check).

    ``lengths`` adds the input ``lengths``; ``states`` the inputs ``h0`` (and ``c0``).
    """
    opset = _check(model, opset)
    lengths, states = bool(lengths), bool(states)
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    op = _OPS[model.mode]
    H, L, dirs = model.hidden_size, model.num_layers, model.num_directions
    params = {k: to_numpy(v).astype(np.float32) for k, v in model.state_dict().items()}
    S = L * dirs
    lstm = op == "LSTM"
    F32 = TensorProto.FLOAT
    xs_shape = ["N", "T", model.input_size] if model.batch_first else ["T", "N", model.input_size]
    out_shape = ["N", "T", dirs * H] if model.batch_first else ["T", "N", dirs * H]
    inputs = [helper.make_tensor_value_info("xs", F32, xs_shape)]
    if lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["N"]))
    if states:
        inputs.append(helper.make_tensor_value_info("h0", F32, [S, "N", H]))
        if lstm:
            inputs.append(helper.make_tensor_value_info("c0", F32, [S, "N", H]))
    outputs = [
        helper.make_tensor_value_info("out", F32, out_shape),
        helper.make_tensor_value_info("h_n", F32, [S, "N", H]),
    ]
    if lstm:
        outputs.append(helper.make_tensor_value_info("c_n", F32, [S, "N", H]))

    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    x = "xs"
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", ["xs"], ["xs_tm"], perm=[1, 0, 2]))
        x = "xs_tm"
    if lengths:  # ONNX's sequence_lens are int32
        nodes.append(helper.make_node("Cast", ["lengths"], ["seq_lens"], to=TensorProto.INT32))
    merge = const("merge_dirs", np.array([0, 0, -1], np.int64))
    h_parts, c_parts = [], []
    for layer in range(L):
        W, R, B, P = [], [], [], []
        for d in range(dirs):
            w_ih, w_hh, b_ih, b_hh = (params.get(n) for n in model._names(layer, d))
            W.append(_blocks(w_ih, op, H))
            R.append(_blocks(w_hh, op, H))
            if model.bias:
                B.append(np.concatenate([_blocks(b_ih, op, H), _blocks(b_hh, op, H)]))
            if model.mode == "lstm_peephole":
                s = "" if d == 0 else "_reverse"
                P.append(np.concatenate([params[f"weight_c{g}_l{layer}{s}"] for g in "iof"]))
        tag = f"l{layer}"
        if states:
            starts = const(f"{tag}_start", np.array([layer * dirs], np.int64))
            ends = const(f"{tag}_end", np.array([(layer + 1) * dirs], np.int64))
            axis0 = const(f"{tag}_axis", np.array([0], np.int64))
        if states:  # this layer's rows of h0 (and c0)
            for s in ("h0", "c0") if lstm else ("h0",):
                nodes.append(helper.make_node("Slice", [s, starts, ends, axis0], [f"{tag}_{s}"]))
        args = [
            x,
            const(f"{tag}_W", np.stack(W)),
            const(f"{tag}_R", np.stack(R)),
            const(f"{tag}_B", np.stack(B)) if B else "",
            "seq_lens" if lengths else "",
            f"{tag}_h0" if states else "",
        ]
        outs = [f"{tag}_Y", f"{tag}_Yh"]
        if lstm:
            args += [f"{tag}_c0" if states else "", const(f"{tag}_P", np.stack(P)) if P else ""]
            outs.append(f"{tag}_Yc")
        attrs: dict[str, Any] = {
            "hidden_size": H,
            "direction": "bidirectional" if dirs == 2 else "forward",
        }
        if op == "RNN":
            act = "Tanh" if model.mode == "rnn_tanh" else "Relu"
            attrs["activations"] = [act] * dirs
        if op == "GRU":
            attrs["linear_before_reset"] = 1
        nodes.append(helper.make_node(op, args, outs, name=f"{op}_{tag}", **attrs))
        nodes.append(helper.make_node("Transpose", [f"{tag}_Y"], [f"{tag}_Yt"], perm=[0, 2, 1, 3]))
        x = f"{tag}_out"
        nodes.append(helper.make_node("Reshape", [f"{tag}_Yt", merge], [x]))
        h_parts.append(f"{tag}_Yh")
        if lstm:
            c_parts.append(f"{tag}_Yc")
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["out"], perm=[1, 0, 2]))
    else:
        nodes.append(helper.make_node("Identity", [x], ["out"]))
    nodes.append(helper.make_node("Concat", h_parts, ["h_n"], axis=0))
    if lstm:
        nodes.append(helper.make_node("Concat", c_parts, ["c_n"], axis=0))

    graph = helper.make_graph(nodes, f"rnn_xp_{model.mode}", inputs, outputs, inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="rnn_xp",
        doc_string=repr(model),
    )
    proto.ir_version = min(proto.ir_version, _ir_version(onnx, opset))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _ir_version(onnx: Any, opset: int) -> int:
    """The IR version that goes with ``opset`` (runtimes refuse a newer IR than they know)."""
    table = [(row[2], row[1]) for row in onnx.helper.VERSION_TABLE]  # (opset, IR version)
    return min((ir for ops, ir in table if ops >= opset), default=onnx.IR_VERSION)


def export(
    model: Any, path: Any, opset: Any = None, lengths: bool = False, states: bool = False
) -> None:
    """Write ``model`` to ``path`` as ONNX (see the module's docstring and `build`).

    Everything is checked before the file is touched; the file is written as
    ``path + '.partial'`` and renamed at the end, so a failed export leaves
    no file that looks complete.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path: {str(path)!r} is a folder; expected a file path")
    proto = build(model, opset, lengths, states)
    data = proto.SerializeToString()
    tmp = Path(str(path) + ".partial")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
