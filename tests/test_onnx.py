"""ONNX export, verified by a real runtime: ONNX Runtime runs every exported configuration.

Every mode x layers {1, 2} x bidirectional x batch_first x with and without
``lengths`` x with and without initial states: ONNX Runtime's outputs equal
`Recurrent.forward`'s within float32's tolerance. The graphs fix no N or T:
each is run at two sizes, neither of them known when it was written.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import rnn_xp
from rnn_xp import onnx_graph
from tests.support import assert_close, call

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

D, H = 3, 5
MODES = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def _grid(mode, seed, num_layers=(1, 2), bias=(True,)):
    """Each (model, config): num_layers x bidirectional x batch_first x bias, seeded."""
    for config in itertools.product(num_layers, [False, True], [False, True], bias):
        layers, bidirectional, batch_first, with_bias = config
        yield (
            rnn_xp.Recurrent(
                mode,
                D,
                H,
                num_layers=layers,
                bidirectional=bidirectional,
                batch_first=batch_first,
                bias=with_bias,
                seed=seed,
            ),
            config,
        )


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(model, N, T, seed, lengths, states):
    rng = np.random.default_rng(seed)
    shape = (N, T, D) if model.batch_first else (T, N, D)
    feed = {"xs": rng.standard_normal(shape).astype(np.float32)}
    kwargs = {}
    if lengths:
        feed["lengths"] = rng.integers(1, T + 1, N).astype(np.int64)
        feed["lengths"][0] = T
        kwargs["lengths"] = feed["lengths"]
    if states:
        S = model.num_layers * model.num_directions
        for name in ("h0", "c0") if model.cell.n_states == 2 else ("h0",):
            feed[name] = rng.standard_normal((S, N, H)).astype(np.float32)
        kwargs["h0"] = (feed["h0"], feed["c0"]) if "c0" in feed else feed["h0"]
    return feed, kwargs


def _check(model, path, lengths, states):
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    for N, T, seed in ((4, 7, 1), (1, 2, 2)):
        feed, kwargs = _inputs(model, N, T, seed, lengths, states)
        assert names == list(feed)
        got = session.run(None, feed)
        xs = feed["xs"]
        out, h_n = model.eval()(xs, kwargs.get("h0"), lengths=kwargs.get("lengths"))
        want = [out, *(h_n if isinstance(h_n, tuple) else (h_n,))]
        assert [o.name for o in session.get_outputs()] == ["out", "h_n", "c_n"][: len(want)]
        for label, g, w in zip(("out", "h_n", "c_n"), got, want):
            assert_close(g, np.asarray(w), "float32", f"{label} N={N} T={T}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_onnx_runtime_runs_every_exported_configuration(tmp_path, mode, num_layers):
    for (model, config), lengths, states in itertools.product(
        _grid(mode, 3, num_layers=(num_layers,)), [False, True], [False, True]
    ):
        _, bidirectional, batch_first, _ = config
        path = tmp_path / f"{bidirectional}{batch_first}{lengths}{states}.onnx"
        model.to_onnx(path, lengths=lengths, initial_state=states)
        _check(model, path, lengths, states)


@pytest.mark.parametrize("mode", [*MODES, "lstm_peephole"])
def test_without_bias_and_the_peephole_lstm(tmp_path, mode):
    for bias in (False, True):
        model = rnn_xp.Recurrent(mode, D, H, num_layers=2, bidirectional=True, bias=bias, seed=4)
        path = tmp_path / f"{mode}{bias}.onnx"
        model.to_onnx(path, lengths=True, initial_state=True)
        _check(model, path, True, True)


def test_each_sequence_of_a_batch_is_the_sequence_alone(tmp_path):
    """Different lengths in one batch give what each sequence gives alone, in ONNX Runtime."""
    model = rnn_xp.Recurrent("lstm", D, H, num_layers=2, bidirectional=True, seed=5)
    model.to_onnx(tmp_path / "m.onnx", lengths=True)
    session = _session(tmp_path / "m.onnx")
    rng = np.random.default_rng(6)
    T, lengths = 6, np.array([6, 2, 4], np.int64)
    xs = rng.standard_normal((T, 3, D)).astype(np.float32)
    out, h_n, c_n = session.run(None, {"xs": xs, "lengths": lengths})
    for n, L in enumerate(lengths):
        alone = {"xs": xs[:L, n : n + 1], "lengths": np.array([L], np.int64)}
        a_out, a_h, a_c = session.run(None, alone)
        assert_close(out[:L, n : n + 1], a_out, "float32", f"out of sequence {n}")
        np.testing.assert_array_equal(out[L:, n], 0)  # padded steps output zeros
        assert_close(h_n[:, n : n + 1], a_h, "float32", f"h_n of sequence {n}")
        assert_close(c_n[:, n : n + 1], a_c, "float32", f"c_n of sequence {n}")


def test_the_file_passes_the_full_checker_and_holds_the_weights_exactly(tmp_path):
    model = rnn_xp.Recurrent("gru", D, H, bidirectional=True, seed=7)
    model.to_onnx(tmp_path / "g.onnx", opset=14)
    proto = onnx.load(str(tmp_path / "g.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 14
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    # ONNX's GRU gates are z, r, h; torch's r, z, n
    w = model.state_dict()["weight_ih_l0_reverse"]
    np.testing.assert_array_equal(
        inits["l0_W"][1], np.concatenate([w[H : 2 * H], w[:H], w[2 * H :]])
    )
    (node,) = [n for n in proto.graph.node if n.op_type == "GRU"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["linear_before_reset"] == 1
    assert attrs["direction"] == b"bidirectional"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: rnn_xp.Recurrent("lstm_layernorm", D, H),
            r"^model: ONNX has no operator for mode 'lstm_layernorm'",
        ),
        (
            lambda: rnn_xp.Recurrent("lstm", D, H, proj_size=2),
            r"^model: ONNX's LSTM has no projections \(proj_size=2\)",
        ),
    ],
)
def test_what_onnx_cannot_express_is_refused_before_any_file(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        make().to_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_cell_of_your_own_is_refused(tmp_path):
    from rnn_xp.cells import Cell, Param

    class Mine(Cell):
        kind = "mine"

        def parameters(self, input_size, hidden_size):
            return {
                "weight_ih": Param((hidden_size, input_size)),
                "bias_ih": Param((hidden_size,), bias=True),
            }

        def step(self, xp, ax, state, params):
            return (xp.tanh(ax + state[0]),), None

    with pytest.raises(ValueError, match=r"^model: ONNX has no operator for mode 'mine'"):
        rnn_xp.Recurrent(Mine(), D, H).to_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("opset", "message"),
    [(13, r"^opset: expected 14 to "), ("17", r"^opset: expected an integer")],
)
def test_a_bad_opset_is_refused(tmp_path, opset, message):
    with pytest.raises(ValueError, match=message):
        rnn_xp.Recurrent("gru", D, H).to_onnx(tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_by_a_complete_one(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="proj_size"):
        rnn_xp.Recurrent("lstm", D, H, proj_size=2).to_onnx(path)
    assert path.read_bytes() == b"old"
    rnn_xp.Recurrent("lstm", D, H).to_onnx(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert onnx.load(str(path)).opset_import[0].version == onnx_graph.DEFAULT_OPSET


# -- the command ------------------------------------------------------------------------


def test_rnn_xp_export_writes_a_file_onnx_runtime_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = rnn_xp.Recurrent("lstm", D, H, num_layers=2, bidirectional=True, seed=8)
    model.save("w.npz")
    rc, out, err = call(["export", "w.npz", "m.onnx", "--lengths", "--initial-state"], capsys)
    assert rc == 0, err
    assert out.startswith("wrote m.onnx: Recurrent('lstm', 3, 5, num_layers=2, bidirectional")
    _check(rnn_xp.load("w.npz"), "m.onnx", True, True)
    rc, _, err = call(["export", "w.npz", "o.onnx", "--opset", "15"], capsys)
    assert rc == 0, err
    assert onnx.load("o.onnx").opset_import[0].version == 15


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.npz", "m.onnx"], "rnn-xp: error: W: no such file 'missing.npz'"),
        (["w.npz", "m.npz"], "rnn-xp: error: OUT: expected a .onnx file name, got 'm.npz'"),
        (["w.npz", "m.onnx", "--opset", "3"], "rnn-xp: error: --opset: expected 14 to "),
        (["w.npz", "m.onnx", "--opset", "x"], "rnn-xp: error: --opset: "),
        (["ln.npz", "m.onnx"], "rnn-xp: error: W: ONNX has no operator for mode 'lstm_layernorm'"),
    ],
)
def test_rnn_xp_export_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    rnn_xp.Recurrent("gru", D, H, seed=0).save("w.npz")
    rnn_xp.Recurrent("lstm_layernorm", D, H, seed=0).save("ln.npz")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = call(["export", *argv], capsys)
    assert (rc, out) == (2, "")
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- import -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [*MODES, "lstm_peephole"])
def test_a_round_trip_is_bit_for_bit_on_the_parameters(tmp_path, mode):
    for model, (_, _, batch_first, bias) in _grid(mode, 9, bias=(False, True)):
        path = tmp_path / "m.onnx"
        model.to_onnx(path, lengths=bias, initial_state=batch_first)
        back = rnn_xp.from_onnx(path)
        config = ("mode", "num_layers", "bidirectional", "batch_first", "bias", "hidden_size")
        assert [getattr(back, k) for k in config] == [getattr(model, k) for k in config]
        want, got = model.state_dict(), back.state_dict()
        assert list(got) == list(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_from_onnx_puts_the_model_on_like_s_library(tmp_path):
    torch = pytest.importorskip("torch")
    rnn_xp.Recurrent("gru", D, H, seed=0).to_onnx(tmp_path / "g.onnx")
    model = rnn_xp.from_onnx(tmp_path / "g.onnx", like=torch.zeros(1))
    assert isinstance(model.state_dict()["weight_ih_l0"], torch.Tensor)


@pytest.mark.parametrize(
    ("module", "kwargs"),
    [
        ("LSTM", {}),
        ("GRU", {}),
        ("RNN", {"nonlinearity": "relu"}),
        ("RNN", {}),
        ("LSTM", {"batch_first": True, "bias": False}),
    ],
)
def test_from_onnx_reads_torch_onnx_export_of_torch_nn_modules(tmp_path, module, kwargs):
    """torch's own exporter (the TorchScript one: the dynamo one needs onnxscript)."""
    import warnings

    torch = pytest.importorskip("torch")
    net = getattr(torch.nn, module)(D, H, num_layers=2, bidirectional=True, **kwargs)
    x = torch.randn(4, 2, D)
    names = ["out", "h_n", "c_n"][: 3 if module == "LSTM" else 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and batch notes
        try:
            torch.onnx.export(
                net,
                (x,),
                str(tmp_path / "t.onnx"),
                dynamo=False,
                input_names=["xs"],
                output_names=names,
                dynamic_axes={"xs": {0: "A", 1: "B"}},
            )
        except Exception as exc:  # an exporter this torch does not have
            pytest.skip(f"torch {torch.__version__} cannot export here: {exc}")
    model = rnn_xp.from_onnx(tmp_path / "t.onnx")
    assert model.batch_first == kwargs.get("batch_first", False)
    want = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # and it runs as torch does
    xs = torch.randn(6, 3, D)
    with torch.no_grad():
        t_out, _ = net(xs)
    out, _ = model.eval()(xs.numpy())
    assert_close(out, t_out.numpy(), "float32", "out")


def _edited(tmp_path, edit, model=None):
    model = model or rnn_xp.Recurrent("gru", D, H, num_layers=2, seed=1)
    model.to_onnx(tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    edit(proto)
    onnx.save(proto, str(tmp_path / "e.onnx"))
    return tmp_path / "e.onnx"


def _attr(proto, op, name, value):
    for node in proto.graph.node:
        if node.op_type == op:
            for a in node.attribute:
                if a.name == name:
                    a.i = value


def _perm(proto):
    for node in proto.graph.node:
        if node.op_type == "Transpose" and node.input[0] == "l0_Y":
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("perm", [0, 1, 2, 3]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.onnx", r"^path: no such file"),
        (
            lambda p: (p / "x.onnx").write_bytes(b"not onnx") and p / "x.onnx",
            r"^path: .* is not a valid ONNX model",
        ),
        (
            lambda p: _edited(p, lambda g: _attr(g, "GRU", "linear_before_reset", 0)),
            r"^path: a GRU without linear_before_reset=1",
        ),
        (
            lambda p: _edited(
                p,
                lambda g: g.graph.node.append(onnx.helper.make_node("Relu", ["out"], ["junk"])),
            ),
            r"^path: the graph has operators other than ONNX's recurrent ones .*: Relu",
        ),
        (lambda p: _edited(p, _perm), r"^path: .* (computes something else|does not run)"),
    ],
)
def test_from_onnx_refuses_what_it_cannot_read_whole(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        rnn_xp.from_onnx(make(tmp_path))


# -- fuzz: a file from_onnx reads is a model or one OnnxError ------------------------------


def _read(path):
    """``from_onnx``'s two outcomes: a model, or an OnnxError (a ValueError); nothing else."""
    try:
        return rnn_xp.from_onnx(path)
    except rnn_xp.onnx_import.OnnxError as exc:
        message = str(exc)
    assert message.startswith("path: "), message
    return None


def test_fuzzed_bytes_give_a_model_or_one_clear_error(tmp_path):
    rnn_xp.Recurrent("lstm", D, H, num_layers=2, bidirectional=True, seed=0).to_onnx(
        tmp_path / "m.onnx", lengths=True, initial_state=True
    )
    data = (tmp_path / "m.onnx").read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(150):
        b = bytearray(data)
        for _ in range(rng.integers(1, 6)):
            pos, kind = int(rng.integers(len(b))), rng.integers(3)
            if kind == 0:
                b[pos] = int(rng.integers(256))
            elif kind == 1:
                del b[pos : pos + int(rng.integers(1, 40))]
            else:
                b[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 16))).tolist())
        (tmp_path / "f.onnx").write_bytes(bytes(b))
        _read(tmp_path / "f.onnx")


def test_fuzzed_graphs_give_a_model_or_one_clear_error(tmp_path):
    import copy

    from onnx import numpy_helper

    rnn_xp.Recurrent("gru", D, H, num_layers=2, bidirectional=True, seed=0).to_onnx(
        tmp_path / "m.onnx", lengths=True, initial_state=True
    )
    base = onnx.load(str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    read = 0
    for _ in range(150):
        proto = copy.deepcopy(base)
        g, kind = proto.graph, rng.integers(5)
        if kind == 0:  # an initializer of another size, shape or dtype
            t = g.initializer[int(rng.integers(len(g.initializer)))]
            a = numpy_helper.to_array(t).ravel()
            a = np.resize(a, int(rng.integers(0, a.size + 3)))
            a = a.astype([np.float32, np.float64, np.float16, np.int32][rng.integers(4)])
            t.CopyFrom(numpy_helper.from_array(a if rng.integers(2) else a[None], t.name))
        elif kind == 1:  # a node left out
            del g.node[int(rng.integers(len(g.node)))]
        elif kind == 2:  # an input rewired
            node = g.node[int(rng.integers(len(g.node)))]
            names = [o for n in g.node for o in n.output] + ["xs", ""]
            if node.input:
                node.input[int(rng.integers(len(node.input)))] = names[rng.integers(len(names))]
        elif kind == 3:  # an attribute changed
            for a in g.node[int(rng.integers(len(g.node)))].attribute:
                if a.type == onnx.AttributeProto.INT:
                    a.i = int(rng.integers(-3, 300))
                elif a.type == onnx.AttributeProto.INTS and len(a.ints):
                    a.ints[int(rng.integers(len(a.ints)))] = int(rng.integers(-2, 5))
                elif a.type == onnx.AttributeProto.STRING:
                    a.s = [b"forward", b"reverse", b"bidirectional", b"x"][rng.integers(4)]
        else:  # another operator
            g.node[int(rng.integers(len(g.node)))].op_type = ["RNN", "LSTM", "GRU", "Identity"][
                rng.integers(4)
            ]
        onnx.save(proto, str(tmp_path / "f.onnx"))
        read += _read(tmp_path / "f.onnx") is not None
    assert 0 < read < 150  # some edits keep a readable model (checked against the file)
