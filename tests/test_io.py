"""Weights on disk: .npz and .safetensors round trips, torch state_dict import."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_xp
from rnn_xp import io

CASES = [
    pytest.param(
        mode,
        layers,
        bi,
        bias,
        suffix,
        id=f"{mode}-l{layers}-{'bi' if bi else 'uni'}-{'bias' if bias else 'nobias'}-{suffix[1:]}",
    )
    for mode in rnn_xp.MODES
    for layers, bi, bias in [(1, False, True), (2, True, False)]
    for suffix in (".npz", ".safetensors")
]


@pytest.mark.parametrize(("mode", "layers", "bi", "bias", "suffix"), CASES)
def test_round_trip_is_bit_for_bit(tmp_path, mode, layers, bi, bias, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model = rnn_xp.Recurrent(
        mode, 4, 5, layers, bias=bias, batch_first=True, bidirectional=bi, seed=3, dtype="float64"
    )
    path = tmp_path / f"w{suffix}"
    model.save(path, extra={"readout": np.arange(6.0)})
    loaded = rnn_xp.load(path)

    assert io._config(loaded) == io._config(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == v.dtype
        np.testing.assert_array_equal(loaded.state_dict()[k], v, err_msg=k)
    np.testing.assert_array_equal(io.load_extra(path)["readout"], np.arange(6.0))
    xs = np.random.default_rng(0).standard_normal((2, 3, 4))
    np.testing.assert_array_equal(loaded.forward(xs)[0], model.forward(xs)[0])
    assert not list(tmp_path.glob("*.partial*"))


def test_npz_loads_without_pickle(tmp_path):
    path = tmp_path / "w.npz"
    rnn_xp.Recurrent("gru", 3, 4, seed=0).save(path)
    with np.load(path, allow_pickle=False) as f:
        assert "__config__" in f.files
        assert "weight_ih_l0" in f.files


def test_load_puts_parameters_on_like(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.npz"
    rnn_xp.Recurrent("lstm", 3, 4, seed=0, dtype="float64").save(path)
    model = rnn_xp.load(path, like=torch.zeros(1))
    assert all(
        isinstance(v, torch.Tensor) and v.dtype == torch.float64
        for v in model.state_dict().values()
    )


@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu", "lstm", "gru"])  # torch's modes
def test_torch_state_dict_file_imports(tmp_path, mode):
    torch = pytest.importorskip("torch")
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(mode, torch.nn.RNN)
    extra = {"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}
    module = cls(3, 4, num_layers=2, bidirectional=True, **extra)
    path = tmp_path / "m.pt"
    torch.save(module.state_dict(), path)
    model = io.load_torch(path, mode=mode if mode.startswith("rnn") else None)
    reference = rnn_xp.from_torch(module)
    xs = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(xs)[0], reference.forward(xs)[0])


def test_plain_rnn_state_dict_needs_a_mode():
    torch = pytest.importorskip("torch")
    state = {k: v.detach().numpy() for k, v in torch.nn.RNN(3, 4).state_dict().items()}
    with pytest.raises(ValueError, match="give --mode rnn_tanh or --mode rnn_relu"):
        io.infer_config(state)
    with pytest.raises(ValueError, match="mode: 'lstm' does not match a state_dict with 1 gate"):
        io.infer_config(state, mode="lstm")
    assert io.infer_config(state, mode="rnn_relu")["mode"] == "rnn_relu"


def test_bad_paths(tmp_path):
    model = rnn_xp.Recurrent("gru", 3, 4)
    with pytest.raises(
        ValueError, match=r"path: expected a .npz or .safetensors file, got '.*w.h5'"
    ):
        model.save(tmp_path / "w.h5")
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        rnn_xp.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="has no rnn_xp configuration"):
        rnn_xp.load(tmp_path / "plain.npz")
