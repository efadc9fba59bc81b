"""Weights files of every model: the LSTM variants, projections, and the user's own cells.

Round trips bit for bit in both formats, the ``cells=`` argument of `load`, files
written before projections existed, and torch LSTMs with ``proj_size`` (their
state_dict files, and ``rnn-xp convert`` of them).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import rnn_xp
from rnn_xp import cells, io
from rnn_xp.io import WeightsError

SUFFIXES = [".npz", ".safetensors"]


def needs(suffix: str) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")


class IndRNN(cells.Cell):
    """IndRNN (Li et al. 2018): ``h_t = relu(x_t @ W.T + b + u * h_{t-1})``, ``u`` a vector."""

    kind = "indrnn"

    def parameters(self, input_size, hidden_size):
        H = hidden_size
        return {
            "weight_ih": cells.Param((H, input_size)),
            "bias_ih": cells.Param((H,), bias=True),
            "weight_hh": cells.Param((H,)),
        }

    def step(self, xp, ax, state, p):
        (h,) = state
        a = ax + p["weight_hh"] * h
        h = xp.where(a > 0, a, xp.zeros_like(a))
        return (h,), None


class WideIndRNN(IndRNN):
    """Another cell of the same kind, with one more parameter: not the file's cell."""

    def parameters(self, input_size, hidden_size):
        return super().parameters(input_size, hidden_size) | {
            "gain": cells.Param((hidden_size,), "ones")
        }


class Other(IndRNN):
    kind = "other"


def make(name: str, dtype: str = "float64") -> rnn_xp.Recurrent:
    """The models of this file: 2 layers, bidirectional, each of another kind."""
    kwargs = {"num_layers": 2, "bidirectional": True, "seed": 3, "dtype": dtype}
    if name == "lstm_proj":
        return rnn_xp.Recurrent("lstm", 4, 5, proj_size=2, batch_first=True, **kwargs)
    if name == "indrnn":
        return rnn_xp.Recurrent(IndRNN(), 4, 5, dropout=0.25, **kwargs)
    if name == "lstm_layernorm":
        return rnn_xp.Recurrent("lstm_layernorm", 4, 5, bias=False, **kwargs)
    return rnn_xp.Recurrent(name, 4, 5, **kwargs)


KINDS = ["lstm_peephole", "lstm_layernorm", "lstm_proj", "indrnn"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", KINDS)
def test_round_trip_is_bit_for_bit(tmp_path, name, suffix):
    needs(suffix)
    model = make(name)
    path = tmp_path / f"w{suffix}"
    model.save(path, extra={"readout": np.arange(6.0)})
    loaded = rnn_xp.load(path, cells=[IndRNN()])

    assert io._config(loaded) == io._config(model)
    assert repr(loaded) == repr(model)
    assert loaded.mode == model.mode
    assert loaded.proj_size == model.proj_size
    assert list(loaded.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == v.dtype
        assert loaded.state_dict()[k].tobytes() == v.tobytes(), k
    extra = io.load_extra(path, cells=IndRNN())
    np.testing.assert_array_equal(extra["readout"], np.arange(6.0))
    xs = np.random.default_rng(0).standard_normal((2, 3, 4))
    loaded.eval()
    model.eval()
    for a, b in zip(loaded.forward(xs), model.forward(xs)):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        for x, y in zip(a, b):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_of_every_dtype(tmp_path, dtype):
    for name in KINDS:
        model = make(name, dtype)
        model.save(tmp_path / "w.npz")
        loaded = rnn_xp.load(tmp_path / "w.npz", cells=IndRNN())
        for k, v in model.state_dict().items():
            assert loaded.state_dict()[k].tobytes() == v.tobytes(), (name, k)


def test_the_configuration_says_the_mode_and_proj_size(tmp_path):
    assert io._config(make("indrnn"))["mode"] == "indrnn"
    assert io._config(make("indrnn"))["nonlinearity"] is None
    assert io._config(make("lstm_peephole"))["mode"] == "lstm_peephole"
    assert io._config(make("lstm_proj"))["proj_size"] == 2
    # Only when it is not 0: every other model's file is as before.
    for name in ("lstm_peephole", "lstm_layernorm", "indrnn"):
        assert "proj_size" not in io._config(make(name))
    assert list(io._config(rnn_xp.Recurrent("lstm", 3, 4))) == list(io.CONFIG_KEYS)
    make("lstm_proj").save(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as f:
        config = json.loads(str(f["__config__"]))
        assert f["weight_hr_l1_reverse"].shape == (2, 5)
        assert f["weight_ih_l1"].shape == (20, 4)  # P * directions
        assert f["weight_hh_l0"].shape == (20, 2)
    assert config["proj_size"] == 2
    assert list(config) == [*io.CONFIG_KEYS, "proj_size"]


# -- the cells= argument ------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_user_cell_file_without_its_cell_says_which_cell(tmp_path, suffix):
    needs(suffix)
    path = tmp_path / f"w{suffix}"
    make("indrnn").save(path)
    for call, name in ((rnn_xp.load, "load"), (io.load_extra, "load_extra")):
        for given in (None, [], Other(), [Other()]):
            with pytest.raises(WeightsError) as info:
                call(path, cells=given)
            error = info.value
            assert error.argument == "cells"
            assert str(error) == f"cells: {error.detail}"
            assert "\n" not in str(error)
            assert error.detail.startswith(
                f"{os.fspath(path)!r}: the model's mode 'indrnn' is not a built-in one; pass "
                f"its cell, an rnn_xp.cells.Cell of kind 'indrnn': {name}(path, cells=MyCell())"
            )
            if given:
                assert error.detail.endswith("(the cells given are of kind ['other'])")


def test_a_cell_of_the_kind_but_other_parameters_is_refused(tmp_path):
    path = tmp_path / "w.npz"
    make("indrnn").save(path)
    with pytest.raises(WeightsError, match=r"^path: .*missing \['gain_l0'") as info:
        rnn_xp.load(path, cells=WideIndRNN())
    assert "expected the parameters of indrnn, input_size 4, hidden_size 5" in str(info.value)


def test_cells_may_be_one_or_many_and_are_ignored_for_built_in_modes(tmp_path):
    make("indrnn").save(tmp_path / "i.npz")
    make("lstm_proj").save(tmp_path / "p.npz")
    cell = IndRNN()
    for given in (cell, [cell], (Other(), cell), [cell, cell]):
        assert rnn_xp.load(tmp_path / "i.npz", cells=given).mode == "indrnn"
    model = rnn_xp.load(tmp_path / "p.npz", cells=[Other(), IndRNN()])
    assert (model.mode, model.proj_size, model._own.kind) == ("lstm", 2, "lstm_proj")
    # The built-in cell itself, by its mode's name, is allowed and changes nothing.
    assert rnn_xp.load(tmp_path / "p.npz", cells=rnn_xp.MODES["lstm_peephole"]).mode == "lstm"


class LSTMLike(IndRNN):
    kind = "lstm"


class NoKind(IndRNN):
    kind = ""


@pytest.mark.parametrize(
    ("given", "error", "fragment"),
    [
        ("indrnn", TypeError, "cells: expected an rnn_xp.cells.Cell instance or a list of them"),
        (
            IndRNN,
            TypeError,
            f"cells: expected an rnn_xp.cells.Cell instance or a list of them, got the class {IndRNN.__module__}.IndRNN, not an instance of it (IndRNN())",
        ),
        ([IndRNN], TypeError, f"cells: item 0 is the class {IndRNN.__module__}.IndRNN, not an"),
        ([IndRNN(), object()], TypeError, "cells: item 1 is builtins.object; expected an"),
        ({"indrnn": IndRNN()}, TypeError, "cells: expected an rnn_xp.cells.Cell instance or"),
        (3, TypeError, "cells: expected an rnn_xp.cells.Cell instance or a list of them"),
        ([NoKind()], TypeError, "cells: item 0, NoKind(), has kind ''; expected a non-empty"),
        ([LSTMLike()], ValueError, "cells: item 0, LSTMLike(), has kind 'lstm', the name of a"),
        ([IndRNN(), WideIndRNN()], ValueError, "cells: items 0 and 1 are both of kind 'indrnn'"),
        (
            [rnn_xp.MODES["lstm_peephole"], Other(), IndRNN(), IndRNN()],
            ValueError,
            "cells: items 2 and 3 are both of kind 'indrnn'; expected one cell per kind",
        ),
    ],
)
def test_bad_cells_are_refused_before_reading(tmp_path, given, error, fragment):
    path = tmp_path / "missing.npz"  # never opened: the argument is checked first
    for call in (rnn_xp.load, io.load_extra):
        with pytest.raises(error) as info:
            call(path, cells=given)
        assert str(info.value).startswith(fragment)


# -- files of earlier versions --------------------------------------------------------

# What every version wrote for Recurrent("gru", 3, 4, seed=0): no proj_size.
OLD_CONFIG = (
    '{"format": 1, "mode": "gru", "input_size": 3, "hidden_size": 4, "num_layers": 1, '
    '"bidirectional": false, "nonlinearity": null, "bias": true, "batch_first": false, '
    '"dropout": 0.0, "dtype": "float32"}'
)


def test_files_of_plain_models_are_as_before_and_still_load(tmp_path):
    model = rnn_xp.Recurrent("gru", 3, 4, seed=0)
    assert json.dumps(io._config(model)) == OLD_CONFIG
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    np.savez(tmp_path / "old.npz", __config__=np.array(OLD_CONFIG), **state)  # as save did
    loaded = rnn_xp.load(tmp_path / "old.npz")
    assert loaded.proj_size == 0
    assert io._config(loaded) == json.loads(OLD_CONFIG)
    for k, v in state.items():
        assert np.asarray(loaded.state_dict()[k]).tobytes() == v.tobytes()
    model.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz", allow_pickle=False) as f:
        assert str(f["__config__"]) == OLD_CONFIG


# -- torch LSTMs with projections -------------------------------------------------------

CONFIGS = [
    pytest.param({"num_layers": 2, "bidirectional": True}, id="l2-bi"),
    pytest.param({"num_layers": 3, "bias": False, "batch_first": True}, id="l3-nobias-bf"),
    pytest.param({}, id="l1"),
]


def torch_lstm(torch, proj_size=2, **kwargs):
    torch.manual_seed(0)
    return torch.nn.LSTM(4, 6, proj_size=proj_size, **kwargs)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_infer_config_of_an_lstm_with_projections(kwargs):
    torch = pytest.importorskip("torch")
    module = torch_lstm(torch, **kwargs)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    config = io.infer_config(state, batch_first=module.batch_first)
    assert config["proj_size"] == 2
    assert (config["mode"], config["input_size"], config["hidden_size"]) == ("lstm", 4, 6)
    assert config["num_layers"] == module.num_layers
    assert config["bidirectional"] == module.bidirectional
    assert config["bias"] == module.bias
    # What infer_config returns is a configuration the reader accepts.
    assert io._check_config(io._Source("path", "'x'"), config, {}) == config
    assert io.infer_config(state, mode="lstm", batch_first=module.batch_first) == config
    with pytest.raises(WeightsError, match=r"^mode: 'gru' does not match a state_dict with 4"):
        io.infer_config(state, mode="gru")
    plain = {k: v.detach().numpy() for k, v in torch.nn.LSTM(4, 6).state_dict().items()}
    assert "proj_size" not in io.infer_config(plain)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_load_torch_of_an_lstm_with_projections(tmp_path, kwargs):
    torch = pytest.importorskip("torch")
    module = torch_lstm(torch, **kwargs).double()
    torch.save(module.state_dict(), tmp_path / "m.pt")
    model = io.load_torch(tmp_path / "m.pt", batch_first=module.batch_first)
    assert (model.mode, model.proj_size, model.hidden_size) == ("lstm", 2, 6)
    reference = rnn_xp.from_torch(module)
    assert io._config(model) == io._config(reference)
    for k, v in module.state_dict().items():
        assert model.state_dict()[k].tobytes() == v.numpy().tobytes(), k
    shape = (3, 5, 4) if module.batch_first else (5, 3, 4)
    xs = np.random.default_rng(1).standard_normal(shape)
    out, (h, c) = model.forward(xs)
    want, (h_t, c_t) = module(torch.asarray(xs))
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, h_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, c_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    # And through save and load, bit for bit.
    model.save(tmp_path / "w.npz")
    again = rnn_xp.load(tmp_path / "w.npz")
    assert np.asarray(again.forward(xs)[0]).tobytes() == np.asarray(out).tobytes()
