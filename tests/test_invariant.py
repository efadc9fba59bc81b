"""The fast paths return what the generic path returns, for every input the API accepts.

`rnn_xp._fastpath` replaces the generic array-API loop where a library allows it:
fused in-place loops on NumPy, CuPy and torch (when autograd is not recording),
one ``lax.scan`` each way on JAX, one task per batch chunk on Dask. Each of them
must accept exactly what the generic path accepts and return the same. Hypothesis
draws from the whole accepted input space rather than from a list of cases:

* every cell kind, batch sizes from 0, one step or several;
* every bias shape that broadcasts to (N, G*H): (G*H,), (1, G*H), (N, G*H), (1,),
  (N, 1), (1, 1), 0-d, or no bias, independently for GRU's two biases;
* every floating dtype the library has, independently per argument (the
  computation dtype is their result type);
* memory layouts: contiguous, transposed (a permuted view), strided (every
  other column) and reversed (negative strides on NumPy);
* initial states and final-state gradients given or omitted, inference mode;
* on torch, tensors with and without ``requires_grad`` (which picks the path);
* for the sequence model: stacked, bidirectional, ``batch_first``, with or
  without biases, ``lengths`` or a ``mask`` (NaN in the padded steps), dropout.

The generic path is the same call with ``_fastpath.DISABLED`` set. Both must give
the same outputs and gradients: present or None alike, same shapes, same dtypes,
values within a tolerance of the result's dtype.
"""

from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnn_xp
from rnn_xp import _fastpath
from rnn_xp._backends import TOLERANCE
from rnn_xp.model import _dtype_name as dtype_name

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
FLOATS = ("float16", "bfloat16", "float32", "float64")
LAYOUTS = ("contiguous", "transposed", "strided", "reversed")

# Disagreement allowed between the two paths, relative to max(1, |value|). They
# run the same operations in a different order (and the fast loops turn
# sigmoid(x) into 0.5 * tanh(x / 2) + 0.5 with halved weights), so they differ
# by a few roundings of the result's dtype per step. float32 and float64 use
# the matrix's tolerances (the worst seen over 1,200 examples per library:
# 4e-7 and 2e-15); float16 and bfloat16, with 11 and 8 significant bits, about
# 50 and 10 of their epsilons (worst seen: 1.2e-2 and 9.7e-3).
AGREE = TOLERANCE | {"float16": 5e-2, "bfloat16": 8e-2}

# The backend fixture hands out a loaded library and holds no state that one
# example could leave behind for the next.
invariant_settings = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextlib.contextmanager
def generic_path():
    """Every fast path off: the generic array-API loop runs."""
    before = _fastpath.DISABLED
    _fastpath.DISABLED = True
    try:
        yield
    finally:
        _fastpath.DISABLED = before


def floating_dtypes(xp) -> list[str]:
    return [name for name in FLOATS if hasattr(xp, name)]


def bias_shapes(N: int, G: int) -> list[tuple[int, ...] | None]:
    """Every shape that broadcasts to (N, G), and None for no bias."""
    return [(G,), (1, G), (N, G), (1,), (N, 1), (1, 1), (), None]


class Maker:
    """Arrays of a backend in a drawn dtype and layout, from float64 NumPy values."""

    def __init__(self, backend, draw):
        self.backend, self.draw = backend, draw
        self.xp = backend.xp
        self.torch = "torch" in backend.name
        self.grad_on: set[str] = set()
        self.rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        self.dtypes = floating_dtypes(self.xp)
        self.base = draw(st.sampled_from(self.dtypes), label="dtype")

    def choose_grads(self, names: list[str]) -> None:
        """On torch, the arguments autograd records: any subset (only a bias, a state...)."""
        if self.torch:
            self.grad_on = self.draw(st.sets(st.sampled_from(names)), label="requires_grad")

    def dtype(self) -> str:
        """Mostly the drawn dtype; a quarter of the arguments any other one (mixed dtypes)."""
        if self.draw(st.integers(0, 3)):
            return self.base
        return self.draw(st.sampled_from(self.dtypes))

    def __call__(self, name, shape, scale=1.0, dtype=None, layout=None):
        values = scale * self.rng.standard_normal(shape)
        dtype = dtype or self.dtype()
        layout = layout or (self.draw(st.sampled_from(LAYOUTS)) if len(shape) else "contiguous")
        return self.place(name, values, dtype, layout)

    def place(self, name: str, values: np.ndarray, dtype: str, layout: str):
        xp = self.xp
        # NumPy casts (which keeps numpy:readonly arrays read-only) where it has
        # the dtype; bfloat16 is cast by the library itself.
        on_numpy = dtype != "bfloat16"

        def put(a):
            base = self.backend.asarray(a.astype(dtype) if on_numpy else a)
            if not on_numpy:
                base = xp.astype(base, getattr(xp, dtype))
            if name in self.grad_on:
                base.requires_grad_(True)  # on the leaf: the views below inherit it
            return base

        if layout == "transposed":
            axes = tuple(reversed(range(values.ndim)))
            return xp.permute_dims(put(np.ascontiguousarray(np.transpose(values))), axes)
        if layout == "strided":
            wide = np.repeat(values, 2, axis=-1)
            return put(wide)[..., ::2]
        if layout == "reversed":
            return xp.flip(put(np.ascontiguousarray(np.flip(values, axis=-1))), axis=-1)
        return put(values)


def assert_paths_agree(backend, fast: list, generic: list) -> None:
    assert [f is None for f in fast] == [g is None for g in generic]
    pairs = [(i, f, g) for i, (f, g) in enumerate(zip(fast, generic)) if g is not None]
    for i, f, g in pairs:
        assert tuple(f.shape) == tuple(g.shape), f"output {i}: {f.shape} != {g.shape}"
        assert f.dtype == g.dtype, f"output {i}: {f.dtype} != {g.dtype}"
    values = to_float64(backend, [a for _, f, g in pairs for a in (f, g)])
    for (i, f, _), got, want in zip(pairs, values[::2], values[1::2]):
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
        err = float(np.max(np.abs(got - want), initial=0.0))
        limit = AGREE[dtype_name(f.dtype)] * scale
        assert err <= limit, f"output {i} ({f.dtype}): fast and generic differ by {err:.3g}"


def to_float64(backend, arrays: list) -> list[np.ndarray]:
    """NumPy float64 copies (Dask computes its shared graph once)."""
    xp = backend.xp
    if "torch" in backend.name:
        arrays = [a.detach() for a in arrays]
    # NumPy has no bfloat16: widen it in the library first.
    arrays = [xp.astype(a, xp.float32) if "bfloat16" in str(a.dtype) else a for a in arrays]
    return [a.astype(np.float64) for a in backend.to_numpy_all(arrays)]


def sequence_call(kind, a, inference: bool) -> list:
    """The sequence function of ``kind`` forward (and backward); every output, in order."""
    if kind.startswith("rnn"):
        nl = kind.removeprefix("rnn_")
        hs, h_n = rnn_xp.rnn_forward(a["xs"], a["Wx"], a["Wh"], a["b"], a["h0"], nonlinearity=nl)
        if inference:
            return [hs, h_n]
        grads = rnn_xp.rnn_backward(
            a["dhs"], a["xs"], hs, a["Wx"], a["Wh"], a["b"], a["h0"], a["dh_n"], nonlinearity=nl
        )
        return [hs, h_n, *grads]
    if kind == "lstm":
        hs, h_n, c_n, cache = rnn_xp.lstm_forward(
            a["xs"], a["Wx"], a["Wh"], a["b"], a["h0"], a["c0"], inference=inference
        )
        if inference:
            return [hs, h_n, c_n]
        return [hs, h_n, c_n, *rnn_xp.lstm_backward(a["dhs"], cache, a["dh_n"], a["dc_n"])]
    hs, h_n, cache = rnn_xp.gru_forward(
        a["xs"], a["Wx"], a["Wh"], a["bx"], a["bh"], a["h0"], inference=inference
    )
    if inference:
        return [hs, h_n]
    return [hs, h_n, *rnn_xp.gru_backward(a["dhs"], cache, a["dh_n"])]


@invariant_settings
@given(data=st.data())
def test_sequence_functions_fast_and_generic_agree(backend, data):
    draw = data.draw
    kind = draw(st.sampled_from(list(GATES)), label="kind")
    N, T, D, H = (draw(st.integers(lo, 4), label=n) for lo, n in zip((0, 1, 1, 1), "NTDH"))
    G = GATES[kind] * H
    make = Maker(backend, draw)
    inference = draw(st.booleans(), label="inference")
    make.choose_grads(["xs", "Wx", "Wh", "b", "bx", "bh", "h0", "c0", "dhs", "dh_n", "dc_n"])
    a = {
        "xs": make("xs", (N, T, D)),
        "Wx": make("Wx", (D, G), D**-0.5),
        "Wh": make("Wh", (H, G), H**-0.5),
    }
    bias_names = ["bx", "bh"] if kind == "gru" else ["b"]
    for name in bias_names:
        shape = draw(st.sampled_from(bias_shapes(N, G)), label=f"{name} shape")
        a[name] = None if shape is None else make(name, shape, 0.5)
    states = ["h0", "c0"] if kind == "lstm" else ["h0"]
    for name in [*states, *("d" + s.removesuffix("0") + "_n" for s in states)]:
        a[name] = make(name, (N, H), 0.5) if draw(st.booleans(), label=f"{name} given") else None
    a["dhs"] = make("dhs", (N, T, H))

    fast = sequence_call(kind, a, inference)
    with generic_path():
        generic = sequence_call(kind, a, inference)
    assert_paths_agree(backend, fast, generic)


def model_call(model, xs, h0, steps, dout, dh_n, inference, dropout_seed) -> list:
    lengths, mask = steps
    out, h_n = model.forward(
        xs, h0, lengths=lengths, mask=mask, inference=inference, dropout_seed=dropout_seed
    )
    states = list(h_n) if isinstance(h_n, tuple) else [h_n]
    if inference:
        return [out, *states]
    dxs = model.backward(dout, dh_n)
    grads = [model.grads[k] for k in sorted(model.grads)]
    return [out, *states, dxs, model.dh0, model.dc0, *grads]


@invariant_settings
@given(data=st.data())
def test_sequence_model_fast_and_generic_agree(backend, data):
    # Recurrent adds what the sequence functions lack: stacked and reversed
    # directions, folded biases, masks (lengths, or Keras masks with gaps), and
    # dropout between layers. NaN in padded steps must reach nothing.
    draw = data.draw
    mode = draw(st.sampled_from(list(GATES)), label="mode")
    N, T, D, H = (draw(st.integers(lo, 3), label=n) for lo, n in zip((0, 1, 1, 1), "NTDH"))
    layers = draw(st.integers(1, 2), label="num_layers")
    bidirectional, batch_first, bias = (draw(st.booleans(), label=n) for n in ("bi", "bf", "b"))
    make = Maker(backend, draw)
    inference = draw(st.booleans(), label="inference")
    dropout = draw(st.sampled_from([0.0, 0.5]), label="dropout") if layers > 1 else 0.0
    model = rnn_xp.Recurrent(
        mode,
        D,
        H,
        layers,
        bias,
        batch_first,
        bidirectional,
        dropout,
        seed=draw(st.integers(0, 100), label="seed"),
        like=make("like", (1,), dtype="float32", layout="contiguous"),
        dtype=make.dtype(),
    )
    make.choose_grads([*model.state_dict(), "xs", "h0", "c0", "dout", "dh_n"])
    if make.torch:
        params = model.state_dict()
        model.load_state_dict({k: v.requires_grad_(k in make.grad_on) for k, v in params.items()})
    S, F = layers * model.num_directions, model.num_directions * H
    step_kind = draw(st.sampled_from(["none", "lengths", "mask"]), label="steps")
    valid = np.ones((N, T), dtype=bool)
    if step_kind == "lengths":
        n = np.array(draw(st.lists(st.integers(1, T), min_size=N, max_size=N)), dtype=np.int64)
        valid = np.arange(T)[None, :] < n[:, None]
    elif step_kind == "mask":
        valid = np.array(
            draw(st.lists(st.booleans(), min_size=N * T, max_size=N * T)), dtype=bool
        ).reshape(N, T)
    x_values = make.rng.standard_normal((N, T, D))
    x_values[~valid] = np.nan  # padding holds NaN: it must reach no output or gradient
    time_first = (1, 0, 2)
    xs = make.place(
        "xs",
        x_values if batch_first else np.transpose(x_values, time_first),
        make.dtype(),
        draw(st.sampled_from(LAYOUTS), label="xs layout"),
    )
    steps = (None, None)
    if step_kind == "lengths":
        index_dtype = draw(
            st.sampled_from(["int64", "int32", "int16", "uint8", "uint16", "uint32", "uint64"]),
            label="lengths dtype",
        )
        steps = (make.backend.asarray(n.astype(index_dtype)), None)
    elif step_kind == "mask":
        steps = (None, make.backend.asarray(valid))
    state_shape = (S, N, H)
    h0 = None
    if draw(st.booleans(), label="h0 given"):
        h0 = make("h0", state_shape, 0.5)
        if mode == "lstm":
            h0 = (h0, make("c0", state_shape, 0.5))
    d_values = make.rng.standard_normal((N, T, F))
    d_values[~valid] = np.nan  # the gradient of an output that is constant zero
    dout = make.place(
        "dout",
        d_values if batch_first else np.transpose(d_values, time_first),
        make.dtype(),
        "contiguous",
    )
    dh_n = None
    if draw(st.booleans(), label="dh_n given"):
        dh_n = make("dh_n", state_shape)
        if mode == "lstm":
            dh_n = (dh_n, None)
    seed = 7 if dropout else None

    fast = model_call(model, xs, h0, steps, dout, dh_n, inference, seed)
    with generic_path():
        generic = model_call(model, xs, h0, steps, dout, dh_n, inference, seed)
    assert_paths_agree(backend, fast, generic)
    for i, f in enumerate(to_float64(backend, [f for f in fast if f is not None])):
        assert not np.isnan(f).any(), f"output {i} holds NaN"
