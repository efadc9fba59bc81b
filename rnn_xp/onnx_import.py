"""ONNX import: `from_onnx` reads a graph of ONNX's RNN, LSTM or GRU nodes as a `Recurrent`.

The inverse of `rnn_xp.onnx_graph` (whose docstring has the mappings): one
recurrent node per layer and the glue between layers. What it cannot read as
such is refused with an `OnnxError` naming the reason, never half read.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .batch import physical_memory
from .model import Recurrent
from .onnx_graph import _ORDER, _onnx

__all__ = ["OnnxError", "from_onnx"]

_RECURRENT = ("RNN", "LSTM", "GRU")
# What stands between the layers in export's graphs and in torch.onnx.export's
# (which builds zero initial states from the input's Shape).
_GLUE = {
    "Transpose",
    "Cast",
    "Slice",
    "Reshape",
    "Identity",
    "Concat",
    "Squeeze",
    "Unsqueeze",
    "Constant",
    "ConstantOfShape",
    "Gather",
    "Shape",
}


class OnnxError(ValueError):
    """A file `from_onnx` cannot read as a recurrent model; the message says why."""


def from_onnx(path: Any, like: Any = None) -> Any:
    """The `Recurrent` an ONNX file of ONNX's RNN, LSTM or GRU nodes holds.

    Reads graphs of one recurrent node per layer (both directions in it) and
    the glue between layers (Transpose, Reshape, Slice, Concat, ...), as
    `export` writes them. The parameters are read exactly (a round trip is
    bit for bit). Where ONNX Runtime is installed, the model is then checked
    against the file: both run on a probe input and must agree, or the file
    is refused. Anything else is an `OnnxError` (a ValueError) naming what
    was not understood, never a half-read model. The model's parameters are
    arrays of ``like``'s library on its device (NumPy when None), in the
    file's dtype, and it is in evaluation mode.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise OnnxError(f"path: no such file {text!r}")
    memory = physical_memory()
    if memory is not None and 4 * os.path.getsize(text) > memory:
        raise OnnxError(f"path: {text!r} is too large to read here")
    onnx = _onnx()
    from onnx import numpy_helper

    try:
        proto = onnx.load(text)
        onnx.checker.check_model(proto)
    except Exception as exc:  # any failure to parse or check: not a model we can read
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise OnnxError(f"path: {text!r} is not a valid ONNX model ({detail})") from None
    graph = proto.graph
    others = sorted({n.op_type for n in graph.node} - _GLUE - set(_RECURRENT))
    if others:
        raise OnnxError(
            f"path: the graph has operators other than ONNX's recurrent ones and the glue "
            f"between layers: {', '.join(others)}"
        )
    layers = [n for n in graph.node if n.op_type in _RECURRENT]
    if not layers:
        raise OnnxError("path: the graph has no RNN, LSTM or GRU node")
    op = layers[0].op_type
    if any(n.op_type != op for n in layers):
        raise OnnxError("path: the graph mixes RNN, LSTM and GRU nodes")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:  # constants given as nodes count as initializers
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in layers]
    mode = _mode(op, attrs)
    H = int(attrs[0]["hidden_size"])
    direction = attrs[0].get("direction", b"forward")
    if any(a.get("direction", b"forward") != direction for a in attrs) or direction not in (
        b"forward",
        b"bidirectional",
    ):
        raise OnnxError(
            "path: every layer must run forward or bidirectional, in the same direction"
        )
    dirs = 2 if direction == b"bidirectional" else 1
    G = {"RNN": 1, "LSTM": 4, "GRU": 3}[op]
    inverse = np.argsort(_ORDER[op])  # torch block j <- ONNX block inverse[j]

    def weight(node: Any, i: int) -> np.ndarray | None:
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            return None
        if name not in inits:
            raise OnnxError(f"path: the input {name!r} of {node.name or op} is not a constant")
        return inits[name]

    def torch_order(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[k * H : (k + 1) * H] for k in inverse], axis=0)

    state, D, has_bias, peephole = {}, None, None, None
    for layer, node in enumerate(layers):
        W, R, B = weight(node, 1), weight(node, 2), weight(node, 3)
        P = weight(node, 7) if op == "LSTM" else None
        width = None if W is None else W.shape[-1]
        expected_in = D if layer == 0 else dirs * H
        if (
            W is None
            or R is None
            or W.shape != (dirs, G * H, W.shape[-1])
            or R.shape != (dirs, G * H, H)
            or (layer > 0 and width != expected_in)
            or (B is not None and B.shape != (dirs, 2 * G * H))
            or (P is not None and P.shape != (dirs, 3 * H))
        ):
            raise OnnxError(f"path: layer {layer}'s weights do not have the shapes of one layer")
        if layer == 0:
            D = width
        if has_bias is None:
            has_bias, peephole = B is not None, P is not None
        if (B is not None) != has_bias or (P is not None) != peephole:
            raise OnnxError("path: some layers have biases (or peepholes) and others not")
        for d in range(dirs):
            s = f"_l{layer}" + ("_reverse" if d else "")
            state[f"weight_ih{s}"] = torch_order(W[d])
            state[f"weight_hh{s}"] = torch_order(R[d])
            if B is not None:
                state[f"bias_ih{s}"] = torch_order(B[d, : G * H])
                state[f"bias_hh{s}"] = torch_order(B[d, G * H :])
            if P is not None:
                for g, k in zip("iof", range(3)):
                    state[f"weight_c{g}{s}"] = P[d, k * H : (k + 1) * H]
    if peephole:
        mode = "lstm_peephole"
    xs = graph.input[0].name if graph.input else None
    batch_first = any(
        n.op_type == "Transpose" and list(n.input) == [xs] for n in graph.node if xs is not None
    )
    dtypes = {a.dtype for a in state.values()}
    if (
        len(dtypes) != 1
        or dtypes & {np.dtype(t) for t in ("float16", "float32", "float64")} != dtypes
    ):
        raise OnnxError(
            f"path: the weights are not of one floating dtype "
            f"({', '.join(sorted(map(str, dtypes)))})"
        )
    dtype = str(dtypes.pop())
    model = Recurrent._configured(
        mode,
        int(D),
        H,
        len(layers),
        bool(has_bias),
        batch_first,
        dirs == 2,
        dtype=dtype,
    )
    model.load_state_dict(state)
    model.eval()
    _agrees(model, proto, text)  # on NumPy, as ONNX Runtime reads it
    return model if like is None else model.to(like=like)


def _mode(op: str, attrs: list[dict]) -> str:
    """The rnn_xp mode of the nodes' operator and attributes; OnnxError if it has none."""
    unsupported = {"clip", "activation_alpha", "activation_beta", "layout", "input_forget"}
    for a in attrs:
        extra = sorted(k for k in unsupported & set(a) if a[k] not in (0, [], b""))
        if extra:
            raise OnnxError(f"path: {op} attributes rnn_xp has no model for: {', '.join(extra)}")
    if op == "GRU":
        if any(a.get("linear_before_reset", 0) != 1 for a in attrs):
            raise OnnxError(
                "path: a GRU without linear_before_reset=1 (torch's formulation) has no rnn_xp "
                "model"
            )
        return "gru"
    acts = {tuple(a.get("activations", [])) for a in attrs}
    if op == "LSTM":
        if any(act and set(act) - {b"Sigmoid", b"Tanh"} for act in acts):
            raise OnnxError("path: an LSTM with other activations than sigmoid and tanh")
        return "lstm"
    names = {x for act in acts for x in act} or {b"Tanh"}
    if names == {b"Tanh"}:
        return "rnn_tanh"
    if names == {b"Relu"}:
        return "rnn_relu"
    raise OnnxError(f"path: an RNN with activations {sorted(n.decode() for n in names)}")


def _agrees(model: Any, proto: Any, text: str) -> None:
    """The model computes what the file does (ONNX Runtime, where installed), or OnnxError."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its refusal is ours to report, once
    rng = np.random.default_rng(0)
    N, T, S = 2, 3, model.num_layers * model.num_directions
    feed, kwargs = {}, {}
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ONNX Runtime's own refusal of the graph
        detail = " ".join(str(exc).split())[:200]
        raise OnnxError(f"path: {text!r} does not run in ONNX Runtime ({detail})") from None
    first = session.get_inputs()[0].name
    for i in session.get_inputs():
        if i.name == "lengths":
            feed[i.name] = kwargs["lengths"] = np.array([T, 2], np.int64)
        elif i.name in ("h0", "c0"):
            feed[i.name] = rng.standard_normal((S, N, model.hidden_size)).astype(np.float32)
        else:
            shape = (N, T) if model.batch_first else (T, N)
            feed[i.name] = rng.standard_normal((*shape, model.input_size)).astype(np.float32)
    h0 = feed.get("h0")
    if h0 is not None and "c0" in feed:
        h0 = (h0, feed["c0"])
    try:
        got = session.run(None, feed)
        out, h_n = model.forward(feed[first], h0, lengths=kwargs.get("lengths"))
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise OnnxError(
            f"path: {text!r} does not run as the model read from it ({detail})"
        ) from None
    want = [out, *(h_n if isinstance(h_n, tuple) else (h_n,))]
    if len(got) != len(want) or any(
        np.shape(g) != np.shape(w) or not np.allclose(g, w, rtol=1e-4, atol=1e-5)
        for g, w in zip(got, want)
    ):
        raise OnnxError(
            f"path: {text!r} computes something else than the model read from it (its glue "
            "between layers is not export's)"
        )
