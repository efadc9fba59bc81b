"""Property-based tests over shapes, bias shapes and dtypes, on every backend."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnn_xp
from tests.support import BIAS_SHAPES, assert_close, make_problem, ref_backward, ref_forward

problems = st.builds(
    make_problem,
    N=st.integers(1, 4),
    T=st.integers(1, 5),
    D=st.integers(1, 4),
    H=st.integers(1, 4),
    bias=st.sampled_from(list(BIAS_SHAPES)),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 2**16),
)

# The backend fixture only hands out a loaded library; it holds no state that one
# example could leave behind for the next.
matrix_settings = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@matrix_settings
@given(p=problems)
def test_any_shape_matches_reference_with_gradients_shaped_like_inputs(backend, p):
    a = p.on(backend)
    hs, h_n = rnn_xp.rnn_forward(a["xs"], a["Wx"], a["Wh"], a["b"], h0=a["h0"])
    grads = rnn_xp.rnn_backward(
        a["dhs"], a["xs"], hs, a["Wx"], a["Wh"], a["b"], h0=a["h0"], dh_n=a["dh_n"]
    )

    ref_hs = ref_forward(p.xs, p.Wx, p.Wh, p.b, p.h0)
    assert_close(backend.to_numpy(hs), ref_hs, p.dtype, "hs")
    assert_close(backend.to_numpy(h_n), ref_hs[:, -1], p.dtype, "h_n")
    refs = ref_backward(p.dhs, p.xs, ref_hs, p.Wx, p.Wh, p.b, p.h0, p.dh_n)
    for name, g, ref, like in zip(
        ["dxs", "dh0", "dWx", "dWh", "db"],
        grads,
        refs,
        [a["xs"], a["h0"], a["Wx"], a["Wh"], a["b"]],
    ):
        assert tuple(g.shape) == tuple(like.shape), name
        assert g.dtype == like.dtype, name
        assert_close(backend.to_numpy(g), ref, p.dtype, name)


@matrix_settings
@given(p=problems, split=st.integers(1, 4))
def test_stateful_split_anywhere_equals_one_run(backend, p, split):
    T = p.xs.shape[1]
    split = min(split, T)
    a = p.on(backend)
    whole = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"]).forward(a["xs"])
    layer = rnn_xp.RNNLayer(a["Wx"], a["Wh"], a["b"], stateful=True)
    layer.forward(a["xs"][:, :split, :])
    if split < T:
        last = layer.forward(a["xs"][:, split:, :])
        assert_close(backend.to_numpy(last), backend.to_numpy(whole)[:, split:], p.dtype, "hs")
    assert_close(backend.to_numpy(layer.h), backend.to_numpy(whole)[:, -1], p.dtype, "h")
