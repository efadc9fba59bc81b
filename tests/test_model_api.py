"""The calls people expect of `Recurrent`: repr, ``model(...)``, ``to``, lengths as a
list, Dask inputs in evaluation, and lists of sequences of different lengths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from array_api_compat import array_namespace, device

import rnn_xp
from tests.support import assert_close

N, T, D, H = 3, 6, 4, 5
LENGTHS = (6, 2, 4)


def problem(backend, dtype="float64", seed=0, **kw):
    """A model on ``backend`` and a time-major input (T, N, D) of it, with NumPy twins."""
    like = backend.asarray(np.zeros(1, dtype=dtype))
    model = rnn_xp.Recurrent("lstm", D, H, seed=seed, like=like, dtype=dtype, **kw)
    xs = np.random.default_rng(seed).standard_normal((T, N, D)).astype(dtype)
    return model, backend.asarray(xs), xs


def flat(result):
    """``(out, h_n)`` or ``(out, (h_n, c_n))`` as a flat list of arrays."""
    out, h_n = result
    return [
        *(out if isinstance(out, list) else [out]),
        *(h_n if isinstance(h_n, tuple) else [h_n]),
    ]


# -- repr and __call__ ------------------------------------------------------------


def test_repr_shows_the_options_that_differ_from_the_defaults():
    model = rnn_xp.Recurrent("lstm", 8, 16, num_layers=2, bidirectional=True, dropout=0.25)
    assert repr(model) == (
        "Recurrent('lstm', 8, 16, num_layers=2, bidirectional=True, dropout=0.25, "
        "dtype=float32, library=numpy, device=cpu)"
    )
    plain = rnn_xp.Recurrent("gru", 3, 4, bias=False, batch_first=True, dtype="float64")
    assert repr(plain) == (
        "Recurrent('gru', 3, 4, bias=False, batch_first=True, dtype=float64, library=numpy, "
        "device=cpu)"
    )


def test_repr_names_the_library_and_device(backend):
    model, xs, _ = problem(backend)
    library = backend.xp.__name__.removeprefix("array_api_compat.")
    assert repr(model).endswith(f"dtype=float64, library={library}, device={device(xs)})")


def test_calling_the_model_is_forward(backend):
    model, xs, _ = problem(backend, num_layers=2, bidirectional=True)
    lengths = backend.asarray(np.array(LENGTHS))
    got = flat(model(xs, lengths=lengths))
    want = flat(model.forward(xs, None, lengths))
    for g, w in zip(backend.to_numpy_all(got), backend.to_numpy_all(want)):
        np.testing.assert_array_equal(g, w)
    model.backward(got[0])  # the call kept what backward needs
    assert set(model.grads) == set(model.state_dict())


# -- to(like=..., dtype=...) ---------------------------------------------------------


def test_to_round_trips_numpy_torch_numpy_bit_for_bit():
    torch = pytest.importorskip("torch")
    model = rnn_xp.Recurrent("gru", D, H, num_layers=2, bidirectional=True, seed=1)
    model = model.to(dtype="float64")
    on_torch = model.to(like=torch.zeros(1))
    assert "library=torch" in repr(on_torch)
    for name, p in on_torch.state_dict().items():
        assert isinstance(p, torch.Tensor), name
        assert p.dtype == torch.float64, name
    back = on_torch.to(like=np.zeros(1))
    for name, p in back.state_dict().items():
        assert type(p) is np.ndarray, name
        assert p.dtype == np.float64, name
        np.testing.assert_array_equal(p, model.state_dict()[name], err_msg=name)
        assert not np.shares_memory(p, model.state_dict()[name]), name
    xs = np.random.default_rng(0).standard_normal((T, N, D))
    out, _ = on_torch(torch.asarray(xs))
    assert_close(out.numpy(), model(xs)[0], "float64", "out")


def test_to_moves_the_parameters_to_like_library_and_device(backend):
    model = rnn_xp.Recurrent("lstm", D, H, bidirectional=True, seed=2, dtype="float64")
    like = backend.asarray(np.zeros((2, 2), dtype=np.float32))  # its dtype does not matter
    moved = model.to(like=like)
    for name, p in moved.state_dict().items():
        assert array_namespace(p) is backend.xp, name
        assert device(p) == device(like), name
        assert p.dtype == backend.xp.float64, name
        np.testing.assert_array_equal(backend.to_numpy(p), model.state_dict()[name], err_msg=name)
    xs = np.random.default_rng(3).standard_normal((T, N, D))
    got, want = flat(moved(backend.asarray(xs))), flat(model(xs))
    for i, (g, w) in enumerate(zip(backend.to_numpy_all(got), want)):
        assert_close(g, w, "float64", f"output {i}")
    back = moved.to(like=np.zeros(1))
    for name, p in back.state_dict().items():
        np.testing.assert_array_equal(p, model.state_dict()[name], err_msg=name)


def test_to_jax_array():
    pytest.importorskip("jax")
    from rnn_xp._backends import BACKENDS

    jax_backend = BACKENDS["jax"].load()  # x64 on, as in the matrix
    model = rnn_xp.Recurrent("rnn_tanh", D, H, seed=4, dtype="float64")
    moved = model.to(like=jax_backend.asarray(np.zeros(1)), dtype="float32")
    assert "dtype=float32, library=jax.numpy" in repr(moved)
    for name, p in moved.state_dict().items():
        assert array_namespace(p) is jax_backend.xp
        assert p.dtype == jax_backend.xp.float32
        np.testing.assert_array_equal(np.asarray(p), model.state_dict()[name].astype(np.float32))


def test_to_casts_and_copies_on_the_same_library(backend, dtype):
    model, xs, _ = problem(backend, dtype="float64")
    model.backward(model.forward(xs)[0])
    copy = model.eval().to(dtype=dtype)
    assert copy is not model
    assert not copy.training
    assert copy.grads is None
    assert copy.dh0 is None
    assert copy.dc0 is None
    with pytest.raises(RuntimeError, match="call forward first"):
        copy.backward(xs)
    for name, p in copy.state_dict().items():
        assert p is not model.state_dict()[name]
        assert p.dtype == getattr(backend.xp, dtype), name
        assert device(p) == device(xs), name
    same = model.to()
    for name, p in same.state_dict().items():
        original = model.state_dict()[name]
        assert p is not original, name
        assert p.dtype == original.dtype, name
    if backend.name == "numpy":
        assert not any(
            np.shares_memory(p, model.state_dict()[k]) for k, p in same.state_dict().items()
        )


def test_to_on_the_same_library_follows_autograd():
    torch = pytest.importorskip("torch")
    model = rnn_xp.Recurrent("gru", D, H, seed=5, like=torch.zeros(1))
    model.load_state_dict({k: v.requires_grad_() for k, v in model.state_dict().items()})
    wide = model.to(dtype="float64")
    for name, p in wide.state_dict().items():
        assert p.requires_grad, name
        assert p.grad_fn is not None, name


def test_astype_is_to_dtype():
    model = rnn_xp.Recurrent("gru", D, H, seed=5)
    a, b = model.astype("float64"), model.to(dtype="float64")
    for name in model.state_dict():
        np.testing.assert_array_equal(a.state_dict()[name], b.state_dict()[name])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"like": "float64"}, TypeError, r"^like: expected an array .* got builtins\.str"),
        ({"like": [0.0]}, TypeError, r"^like: expected an array"),
        ({"dtype": "int32"}, TypeError, r"^dtype: expected a real floating dtype"),
        ({"dtype": "float128x"}, TypeError, r"^dtype: expected a real floating dtype"),
    ],
)
def test_to_rejects_bad_arguments_naming_them(kwargs, error, match):
    model = rnn_xp.Recurrent("gru", D, H, seed=5)
    with pytest.raises(error, match=match):
        model.to(**kwargs)


def test_to_names_like_when_its_library_cannot_hold_the_model_dtype():
    torch = pytest.importorskip("torch")
    model = rnn_xp.Recurrent("gru", D, H, seed=5, like=torch.zeros(1), dtype="bfloat16")
    with pytest.raises(TypeError, match=r"^like: the model is bfloat16, .* pass dtype= too"):
        model.to(like=np.zeros(1))
    widened = model.to(like=np.zeros(1), dtype="float32")  # through float32, exactly
    for name, p in widened.state_dict().items():
        np.testing.assert_array_equal(p, model.state_dict()[name].float().numpy(), err_msg=name)


# -- import rnn_xp ---------------------------------------------------------------


def test_import_reaches_batch_and_optim_without_heavy_libraries():
    code = (
        "import sys, rnn_xp\n"
        "assert rnn_xp.optim.Adam and rnn_xp.batch.run_file\n"
        "print(' '.join(m for m in ('torch', 'jax', 'dask', 'cupy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"import rnn_xp imported {done.stdout.strip()}"


# -- lengths as a Python sequence -------------------------------------------------


@pytest.mark.parametrize("kind", [list, tuple, lambda v: [np.int32(x) for x in v]])
def test_lengths_may_be_a_sequence_of_ints(backend, kind):
    model, xs, _ = problem(backend, bidirectional=True)
    want = flat(model.forward(xs, lengths=backend.asarray(np.array(LENGTHS))))
    got = flat(model.forward(xs, lengths=kind(LENGTHS)))
    for g, w in zip(backend.to_numpy_all(got), backend.to_numpy_all(want)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    ("lengths", "error", "match"),
    [
        (
            [6, 0, 4],
            ValueError,
            r"^lengths: expected every length in \[1, T=6\], got values from 0",
        ),
        ([6, 7, 4], ValueError, r"^lengths: expected every length in \[1, T=6\], .* to 7"),
        ([6, 2], ValueError, r"^lengths: expected shape \(N=3,\), got \(2,\)"),
        ([6, 2.0, 4], TypeError, r"^lengths: expected .* a sequence of ints, got an item 2\.0"),
        ([6, True, 4], TypeError, r"^lengths: expected .* a sequence of ints, got an item True"),
        ([[6], [2], [4]], TypeError, r"^lengths: expected .* got an item \[6\]"),
    ],
)
def test_bad_lengths_sequences_are_named(backend, lengths, error, match):
    model, xs, _ = problem(backend)
    with pytest.raises(error, match=match):
        model.forward(xs, lengths=lengths)


# -- Dask input to a model of another library ----------------------------------------


@pytest.fixture
def da():
    return pytest.importorskip("dask.array")


def dask_problem(da, **kw):
    model = rnn_xp.Recurrent("gru", D, H, seed=6, dtype="float64", **kw)
    xs = np.random.default_rng(6).standard_normal((T, 8, D))
    return model, xs, da.from_array(xs, chunks=(T, 3, D))


@pytest.mark.parametrize(
    ("options", "mode"),
    [
        ({"num_layers": 2, "dropout": 0.5}, "eval"),
        ({"num_layers": 2, "bidirectional": True}, "train"),  # no dropout to apply
        ({"dropout": 0.5}, "train"),  # one layer: dropout does not apply
    ],
)
def test_dask_input_runs_one_task_per_chunk_without_inference(da, options, mode):
    model, xs, lazy = dask_problem(da, **options)
    model.train(mode == "train")
    lengths = [6, 1, 3, 6, 2, 5, 4, 6]
    out, h_n = model(lazy, lengths=lengths)
    assert isinstance(out, da.Array)
    assert isinstance(h_n, da.Array)
    assert out.chunks[1] == (3, 3, 2)
    want_out, want_h = model.forward(xs, lengths=lengths)
    np.testing.assert_allclose(out.compute(), want_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_n.compute(), want_h, rtol=0, atol=1e-12)
    model.forward(lazy)  # a Dask forward replaces the NumPy one's cache
    with pytest.raises(RuntimeError, match=r"call forward first .* one task per chunk"):
        model.backward(out)


def test_dask_input_with_dropout_in_training_says_what_to_do(da):
    model, _, lazy = dask_problem(da, num_layers=2, dropout=0.5)
    with pytest.raises(TypeError, match=r"^xs: a Dask array .* call model\.eval\(\) first"):
        model.forward(lazy, dropout_seed=0)
    with pytest.raises(TypeError, match=r"^xs: a Dask array .* call model\.eval\(\) first"):
        model.forward(lazy, dropout_seed=0, inference=True)


def test_a_model_of_dask_arrays_trains_op_by_op_in_either_mode(da):
    import dask

    model, xs, lazy = dask_problem(da, num_layers=2)
    on_dask = model.to(like=lazy)
    dout = np.random.default_rng(7).standard_normal((T, 8, H))
    model.forward(xs)
    want = [model.backward(dout), *model.grads.values()]
    for m in (on_dask, on_dask.eval()):  # eval turns dropout off, not gradients
        m(lazy)
        got = dask.compute(m.backward(da.from_array(dout)), *m.grads.values())
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


# -- lists of sequences of different lengths -------------------------------------------

RAGGED = [
    pytest.param("rnn_tanh", False, id="rnn_tanh"),
    pytest.param("lstm", True, id="lstm-batch_first"),
    pytest.param("gru", False, id="gru"),
]


def ragged_problem(backend, mode, batch_first, lengths=(4, 1, 3)):
    like = backend.asarray(np.zeros(1))
    model = rnn_xp.Recurrent(
        mode,
        D,
        H,
        num_layers=2,
        bidirectional=True,
        batch_first=batch_first,
        seed=8,
        like=like,
        dtype="float64",
    )
    rng = np.random.default_rng(8)
    seqs = [rng.standard_normal((t, D)) for t in lengths]
    douts = [rng.standard_normal((t, 2 * H)) for t in lengths]
    return model, seqs, douts


def alone(model, backend, x, dout, batch_first):
    """Forward and backward of one sequence (T_i, D) as a batch of one."""
    add = (lambda a: a[None]) if batch_first else (lambda a: a[:, None])
    drop = (lambda a: a[0]) if batch_first else (lambda a: a[:, 0])
    out, h_n = model(backend.asarray(add(x)))
    dxs = model.backward(backend.asarray(add(dout)))
    states = list(h_n) if isinstance(h_n, tuple) else [h_n]
    grads = [model.grads[k] for k in sorted(model.grads)]
    out, dxs, *rest = backend.to_numpy_all([out, dxs, *states, *grads])
    k = len(states)
    return drop(out), [s[:, 0] for s in rest[:k]], drop(dxs), rest[k:]


@pytest.mark.parametrize(("mode", "batch_first"), RAGGED)
def test_a_list_of_sequences_equals_each_sequence_alone(backend, mode, batch_first):
    model, seqs, douts = ragged_problem(backend, mode, batch_first)
    outs, h_n = model([backend.asarray(x) for x in seqs])
    dxs = model.backward([backend.asarray(d) for d in douts])
    states = list(h_n) if isinstance(h_n, tuple) else [h_n]
    assert isinstance(outs, list)
    assert isinstance(dxs, list)
    got_out, got_dx = backend.to_numpy_all(outs), backend.to_numpy_all(dxs)
    got_states = backend.to_numpy_all(states)
    got_grads = backend.to_numpy_all([model.grads[k] for k in sorted(model.grads)])
    sums = [np.zeros_like(g) for g in got_grads]
    for i, (x, dout) in enumerate(zip(seqs, douts)):
        out, states_i, dx, grads = alone(model, backend, x, dout, batch_first)
        assert_close(got_out[i], out, "float64", f"out[{i}]")
        assert_close(got_dx[i], dx, "float64", f"dxs[{i}]")
        for j, s in enumerate(states_i):
            assert_close(got_states[j][:, i], s, "float64", f"state {j} of sequence {i}")
        sums = [a + g for a, g in zip(sums, grads)]
    for name, g, want in zip(sorted(model.grads), got_grads, sums):
        assert_close(g, want, "float64", name)


def test_a_list_of_dask_sequences_runs_per_chunk_in_eval(da):
    model = rnn_xp.Recurrent("lstm", D, H, bidirectional=True, seed=9, dtype="float64").eval()
    seqs = [np.random.default_rng(i).standard_normal((t, D)) for i, t in enumerate((3, 5, 1))]
    outs, (h_n, c_n) = model([da.from_array(x) for x in seqs])
    want_outs, (want_h, want_c) = model(seqs)
    for got, want in zip(outs, want_outs):
        np.testing.assert_allclose(got.compute(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_n.compute(), want_h, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_n.compute(), want_c, rtol=0, atol=1e-12)


def test_ragged_forward_and_backward_refuse_mismatches_naming_the_argument():
    model = rnn_xp.Recurrent("gru", D, H, seed=10, dtype="float64")
    seqs = [np.ones((3, D)), np.ones((2, D))]
    with pytest.raises(ValueError, match=r"^lengths: a list of sequences gives its own"):
        model(seqs, lengths=[3, 2])
    with pytest.raises(ValueError, match=r"^mask: a list of sequences gives its own"):
        model(seqs, mask=np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"^xs: expected at least one sequence"):
        model([])
    with pytest.raises(ValueError, match=r"^xs\[1\]: expected shape \(T_i, D=4\)"):
        model([np.ones((3, D)), np.ones((2, D + 1))])
    with pytest.raises(ValueError, match=r"^xs\[1\]: expected at least one time step"):
        model([np.ones((3, D)), np.ones((0, D))])
    with pytest.raises(TypeError, match=r"^xs\[1\]: expected the dtype of xs\[0\] \(float64\)"):
        model([np.ones((3, D)), np.ones((2, D), dtype=np.float32)])
    with pytest.raises(TypeError, match=r"^xs\[1\]: expected an array"):
        model([np.ones((3, D)), "seq"])

    outs, _ = model(seqs)
    with pytest.raises(TypeError, match=r"^dout: the forward took a list of sequences"):
        model.backward(np.ones((3, 2, H)))
    with pytest.raises(ValueError, match=r"^dout: expected a list of 2 arrays"):
        model.backward(outs[:1])
    with pytest.raises(ValueError, match=r"^dout\[1\]: expected shape \(T_i=2, F=5\)"):
        model.backward([outs[0], np.ones((3, H))])
    model.backward(outs)  # still there after the refusals

    model(np.ones((3, 2, D)))
    with pytest.raises(TypeError, match=r"^dout: expected one array, as the forward took one"):
        model.backward(outs)
