"""Weights files that are damaged, crafted or of the wrong kind: one WeightsError, never more.

The loaders read untrusted files. Every case here, and every case the fuzz tests
generate, must end either in the model as saved (bit for bit) or in a
`WeightsError` whose message is one line naming the file: never another
exception, never a pickle run, never an allocation of the size a file merely
claims.
"""

from __future__ import annotations

import errno
import io as _io
import json
import os
import pickle
import re
import stat
import struct
import sys
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnn_xp
from rnn_xp import io
from rnn_xp.io import WeightsError

SUFFIXES = [".npz", ".safetensors"]
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ST_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32"}


# Eight parameters, two directions (every name pattern), in files of 1.5 to 4 KiB.
MODEL = rnn_xp.Recurrent("lstm", 3, 2, bidirectional=True, seed=1)
STATE = {k: np.asarray(v) for k, v in MODEL.state_dict().items()}
CONFIG = io._config(MODEL)
EXTRAS = {"vocab": np.arange(5, dtype=np.int32)}
PERMISSIONS = hasattr(os, "geteuid") and os.geteuid() != 0  # root reads and writes anything


def needs(suffix: str) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")


# -- writing files of any content ------------------------------------------------


def npy(a: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def write_zip(path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of repeated names, which some tests want
        with zipfile.ZipFile(path, "w", method) as z:
            for name, data in members.items():
                z.writestr(name.split("|")[0], data)  # "name|2": a second member "name"


def npz_members(state: dict[str, np.ndarray], config) -> dict[str, bytes]:
    """The members of an rnn_xp .npz; ``config`` a dict (as JSON) or the literal text."""
    text = config if isinstance(config, str) else json.dumps(config)
    return {"__config__.npy": npy(np.array(text))} | {f"{k}.npy": npy(v) for k, v in state.items()}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata) -> bytes:
    """A .safetensors file written here, byte by byte, so that anything can be crafted."""
    header, blobs, offset = {}, [], 0
    for k, a in tensors.items():
        blob = np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
        header[k] = {
            "dtype": ST_DTYPES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    if metadata is not None:
        header["__metadata__"] = metadata
    return raw_safetensors(json.dumps(header).encode(), b"".join(blobs))


def raw_safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def write_model_file(path, config, state=STATE) -> None:
    """An rnn_xp file of either format with ``config`` (dict or literal text) and ``state``."""
    text = config if isinstance(config, str) else json.dumps(config)
    if str(path).endswith(".npz"):
        write_zip(path, npz_members(state, text))
    else:
        path.write_bytes(safetensors_bytes(state, {"rnn_xp": text}))


def expect_error(call, path, *fragments: str) -> WeightsError:
    """``call(path)`` raises one WeightsError naming ``path``, one line, with ``fragments``."""
    with pytest.raises(WeightsError) as info:
        call(path)
    exc = info.value
    assert exc.argument == "path"
    assert str(exc) == f"path: {exc.detail}"
    assert "\n" not in str(exc)
    assert "\r" not in str(exc)
    assert repr(os.fspath(path)) in exc.detail
    for fragment in fragments:
        assert fragment in exc.detail
    return exc


def assert_same_state(model: rnn_xp.Recurrent, values: bool = True) -> None:
    state = model.state_dict()
    assert state.keys() == STATE.keys()
    for k, v in STATE.items():
        assert (state[k].dtype, state[k].shape) == (v.dtype, v.shape), k
        if values:
            assert state[k].tobytes() == v.tobytes(), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of MODEL saved in each format, with one extra array."""
    folder = tmp_path_factory.mktemp("saved")
    out = {}
    for suffix in SUFFIXES:
        if suffix == ".safetensors" and not _has_safetensors():
            continue
        MODEL.save(folder / f"w{suffix}", extra=EXTRAS)
        out[suffix] = (folder / f"w{suffix}").read_bytes()
    return out


def _has_safetensors() -> bool:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


# -- the error itself ------------------------------------------------------------------


def test_weights_error_pickles_for_dask_workers():
    exc = WeightsError("path", "'w.npz' is empty (0 bytes)")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is WeightsError
    assert (back.argument, back.detail) == (exc.argument, exc.detail)


# -- files that are not there or not files ---------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_file_is_a_weights_error_and_file_not_found(tmp_path, suffix):
    exc = expect_error(rnn_xp.load, tmp_path / f"missing{suffix}", "no such file")
    assert isinstance(exc, FileNotFoundError)
    assert exc.detail == f"no such file {str(tmp_path / f'missing{suffix}')!r}"
    (tmp_path / f"link{suffix}").symlink_to(tmp_path / "nowhere")
    expect_error(rnn_xp.load, tmp_path / f"link{suffix}", "is a broken symbolic link")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_folder_empty_file_and_fifo(tmp_path, suffix):
    (tmp_path / f"d{suffix}").mkdir()
    expect_error(rnn_xp.load, tmp_path / f"d{suffix}", "is a folder; expected a weights file")
    (tmp_path / f"e{suffix}").write_bytes(b"")
    expect_error(rnn_xp.load, tmp_path / f"e{suffix}", "is empty (0 bytes)")
    expect_error(io.load_extra, tmp_path / f"e{suffix}", "is empty (0 bytes)")
    if hasattr(os, "mkfifo"):  # opening a FIFO would block forever
        os.mkfifo(tmp_path / f"f{suffix}")
        expect_error(rnn_xp.load, tmp_path / f"f{suffix}", "is not a regular file")


def test_wrong_suffix_and_bad_path_types(tmp_path):
    with pytest.raises(
        WeightsError, match=r"^path: expected a \.npz or \.safetensors file, got '.*w\.h5'$"
    ):
        rnn_xp.load(tmp_path / "w.h5")
    with pytest.raises(
        TypeError, match=r"^path: expected a str or os\.PathLike, got builtins\.int$"
    ):
        rnn_xp.load(3)
    with pytest.raises(WeightsError, match="contains a NUL character"):
        rnn_xp.load("w\0.npz")


@pytest.mark.skipif(not PERMISSIONS, reason="needs POSIX permissions, which root bypasses")
def test_unreadable_file(tmp_path):
    MODEL.save(tmp_path / "w.npz")
    os.chmod(tmp_path / "w.npz", 0)
    expect_error(rnn_xp.load, tmp_path / "w.npz", "cannot read", "Permission denied")


def test_like_that_is_not_an_array(tmp_path):
    MODEL.save(tmp_path / "w.npz")
    with pytest.raises(TypeError, match=r"^like: expected an array .* got builtins\.str$"):
        rnn_xp.load(tmp_path / "w.npz", like="numpy")


# -- .npz -------------------------------------------------------------------------------


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"hello, I am text\n" * 10)
    expect_error(rnn_xp.load, tmp_path / "w.npz", "is not a readable .npz archive", "not a zip")


def test_npz_without_config(tmp_path):
    np.savez(tmp_path / "w.npz", **STATE)
    expect_error(
        rnn_xp.load, tmp_path / "w.npz", "has no rnn_xp configuration (no __config__ member)"
    )


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (np.float64(1.0), "'__config__' has dtype float64; expected a string"),
        (np.array(["{}", "{}"]), "__config__ has shape (2,) and dtype <U2; expected one string"),
    ],
)
def test_npz_config_that_is_not_one_string(tmp_path, config, fragment):
    write_zip(
        tmp_path / "w.npz",
        npz_members(STATE, "") | {"__config__.npy": npy(np.asarray(config))},
    )
    expect_error(rnn_xp.load, tmp_path / "w.npz", fragment)


TRIPPED: list[bool] = []


def _trip() -> int:
    TRIPPED.append(True)
    return 0


class Trap:
    """Unpickling this calls `_trip`: any loader that unpickles is caught."""

    def __reduce__(self):
        return _trip, ()


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path):
    trap = np.array([Trap(), Trap()], dtype=object)
    for name in ("weight_ih_l0", "extra.vocab", "__config__"):
        write_zip(tmp_path / "w.npz", npz_members(STATE, CONFIG) | {f"{name}.npy": npy(trap)})
        for call in (rnn_xp.load, io.load_extra):
            expect_error(call, tmp_path / "w.npz", "holds Python objects (pickled data)")
    assert not TRIPPED


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((8, 3), np.int64), "weight_ih_l0 has dtype int64; expected float32"),
        (np.zeros((8, 3), np.float64), "weight_ih_l0 has dtype float64; expected float32"),
        (np.zeros((8, 3), np.complex64), "has dtype complex64; expected bool, integer or float"),
        (np.zeros((8, 3), "<U1"), "has dtype <U1; expected bool, integer or float"),
        (np.zeros(3, [("a", "f4")]), "expected bool, integer or float"),
        (np.zeros((3, 8), np.float32), "weight_ih_l0 has shape (3, 8); expected (8, 3) for lstm"),
        (np.zeros((8, 3, 1), np.float32), "weight_ih_l0 has shape (8, 3, 1); expected (8, 3)"),
    ],
)
def test_npz_member_of_the_wrong_kind(tmp_path, array, fragment):
    write_zip(tmp_path / "w.npz", npz_members(STATE | {"weight_ih_l0": array}, CONFIG))
    expect_error(rnn_xp.load, tmp_path / "w.npz", fragment)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda s: {k: v for k, v in s.items() if k != "bias_hh_l0"},
            "bidirectional; missing ['bias_hh_l0']",
        ),
        (
            lambda s: s | {"weight_ih_l1": s["weight_ih_l0"]},
            "bidirectional; unexpected ['weight_ih_l1']",
        ),
        (lambda s: s | {"weight_hh_l0": s["weight_hh_l0"].T.copy()}, "weight_hh_l0 has shape"),
        (lambda s: {}, "missing ['bias_hh_l0', 'bias_hh_l0_reverse', 'bias_ih_l0', 'bias_ih_l0_r"),
    ],
)
def test_parameters_that_do_not_fit_the_configuration(tmp_path, suffix, change, fragment):
    needs(suffix)
    state = change(dict(STATE))
    write_model_file(tmp_path / f"w{suffix}", CONFIG, state)
    expect_error(rnn_xp.load, tmp_path / f"w{suffix}", fragment)


def test_npz_zip_structure(tmp_path):
    good = npz_members(STATE, CONFIG)
    path = tmp_path / "w.npz"
    write_zip(path, good | {"notes.txt": b"hello"})
    expect_error(rnn_xp.load, path, "member 'notes.txt' is not a .npy array")
    write_zip(path, good | {"weight_ih_l0.npy|2": good["weight_ih_l0.npy"]})
    expect_error(rnn_xp.load, path, "holds two members named 'weight_ih_l0.npy'")
    write_zip(path, good, zipfile.ZIP_BZIP2)
    expect_error(
        rnn_xp.load, path, "uses compression method 12; expected stored (0) or deflated (8)"
    )
    # np.savez_compressed's members are deflated: read as well.
    write_zip(path, good, zipfile.ZIP_DEFLATED)
    assert_same_state(rnn_xp.load(path))


def patch_central(data: bytes, member: str, field: int, value: int, width: int = 4) -> bytes:
    """``data`` with a field of ``member``'s central-directory entry overwritten."""
    at = data.index(b"PK\x01\x02" + b"", data.rindex(b"PK\x05\x06") - 4096)
    while data[at + 46 : at + 46 + len(member)] != member.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    return data[: at + field] + value.to_bytes(width, "little") + data[at + field + width :]


def test_npz_sizes_the_zip_cannot_hold(tmp_path):
    path = tmp_path / "w.npz"
    write_zip(path, npz_members(STATE, CONFIG))
    data = path.read_bytes()
    # Central directory: flags at 8, sizes (compressed, uncompressed) at 20 and 24.
    path.write_bytes(patch_central(data, "weight_hh_l0.npy", 24, 10**9))
    expect_error(rnn_xp.load, path, "member 'weight_hh_l0.npy' claims 1000000000 bytes")
    path.write_bytes(patch_central(data, "weight_hh_l0.npy", 20, 10**9))
    expect_error(rnn_xp.load, path, "member 'weight_hh_l0.npy' claims")
    path.write_bytes(patch_central(data, "weight_hh_l0.npy", 8, 1, width=2))
    expect_error(rnn_xp.load, path, "member 'weight_hh_l0.npy' is encrypted")


def test_npz_damaged_data_fails_its_crc(tmp_path):
    path = tmp_path / "w.npz"
    write_zip(path, npz_members(STATE, CONFIG))
    data = bytearray(path.read_bytes())
    at = data.index(npy(STATE["weight_hh_l0"])) + 140  # inside the array's data
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    expect_error(rnn_xp.load, path, "member 'weight_hh_l0' cannot be read", "CRC")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"\x93NUMPY\x03\x00" + struct.pack("<I", 6) + b"{}    ", "unsupported .npy format"),
        (b"\x93NUMPX\x01\x00", "magic string is not correct"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'", "not a valid .npy array"),
        (b"\x93NUMPY\x01\x00\xff\xff", "not a valid .npy array"),
        (b"\x93NUMPY\x02\x00\xff\xff\xff\xff", "not a valid .npy array"),
    ],
)
def test_npz_member_headers_that_are_not_npy(tmp_path, header, fragment):
    write_zip(tmp_path / "w.npz", npz_members(STATE, CONFIG) | {"weight_ih_l0.npy": header})
    expect_error(rnn_xp.load, tmp_path / "w.npz", "weight_ih_l0", fragment)


def npy_header(descr: str, shape: str, fortran: str = "False") -> bytes:
    text = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    text = text.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


@pytest.mark.parametrize(
    ("descr", "shape", "fragment"),
    [
        ("'<f4'", "(-8, 3)", "has an invalid shape (-8, 3)"),
        ("'<f4'", "(True, 3)", "has an invalid shape (True, 3)"),
        ("'<f4'", "(8, 3.0)", "not a valid .npy array"),
        ("'a'", "(8, 3)", "not a valid .npy array"),  # a deprecated alias: a warning
        ("'\\d'", "(8, 3)", "not a valid .npy array"),  # an invalid escape: a warning
        ("('<f4', (2,))", "(8, 3)", "its header (('<f4', (2,)), shape (8, 3)) needs 192"),
        ("'O'", "(8, 3)", "holds Python objects"),
        ("'<f4'", "(8, 3) + (1,)", "not a valid .npy array"),
        ("'<f4'", "(8,)", "holds 96 data bytes; its header (float32, shape (8,)) needs 32"),
    ],
)
def test_npz_crafted_headers(tmp_path, descr, shape, fragment):
    member = npy_header(descr, shape) + STATE["weight_ih_l0"].tobytes()
    write_zip(tmp_path / "w.npz", npz_members(STATE, CONFIG) | {"weight_ih_l0.npy": member})
    expect_error(rnn_xp.load, tmp_path / "w.npz", fragment)


def test_npz_fortran_order_and_big_endian_members_load_exactly(tmp_path):
    state = {k: np.asfortranarray(v).astype(">f4") for k, v in STATE.items()}
    write_zip(tmp_path / "w.npz", npz_members(state, CONFIG))
    assert_same_state(rnn_xp.load(tmp_path / "w.npz"))


def peak_of(call) -> int:
    """Peak bytes traced while ``call()`` runs (it must raise a WeightsError)."""
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_claims_allocate_nothing(tmp_path):
    """Sizes a file claims are compared with the file before anything of that size exists."""
    limit = 4 << 20
    huge = 10**6
    big = CONFIG | {"hidden_size": huge}
    # A header claiming a 4 TB array, over 96 bytes of data.
    member = npy_header("'<f4'", f"({4 * huge}, {huge})") + bytes(96)
    write_zip(tmp_path / "a.npz", npz_members(STATE, big) | {"weight_ih_l0.npy": member})
    assert peak_of(lambda: rnn_xp.load(tmp_path / "a.npz")) < limit
    # A configuration claiming 10**12 units, 10**9 layers, over small tensors.
    for claim in ({"hidden_size": 10**12}, {"num_layers": 10**9}, {"input_size": 10**15}):
        write_model_file(tmp_path / "b.npz", CONFIG | claim)
        assert peak_of(lambda: rnn_xp.load(tmp_path / "b.npz")) < limit
    if _has_safetensors():
        shape = [10**12, 10**12]
        for offsets in ([0, 96], [0, 4 * 10**24]):
            header = {"weight_ih_l0": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
            header["__metadata__"] = {"rnn_xp": json.dumps(CONFIG)}
            (tmp_path / "c.safetensors").write_bytes(
                raw_safetensors(json.dumps(header).encode(), bytes(96))
            )
            assert peak_of(lambda: rnn_xp.load(tmp_path / "c.safetensors")) < limit
        header = struct.pack("<Q", 2**63) + b"{}"
        (tmp_path / "d.safetensors").write_bytes(header)
        assert peak_of(lambda: rnn_xp.load(tmp_path / "d.safetensors")) < limit


def test_npz_zip_bomb_is_refused_before_decompressing(tmp_path):
    """A deflated member that really expands to 64 MiB, where the configuration implies 96 B."""
    path = tmp_path / "w.npz"
    n = 16 << 20
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in npz_members(STATE, CONFIG).items():
            if name != "weight_ih_l0.npy":
                z.writestr(name, data)
        with z.open("weight_ih_l0.npy", "w") as m:
            m.write(npy_header("'<f4'", f"({n // 3}, 3)"))
            zeros = bytes(1 << 20)
            for _ in range(4 * n // len(zeros) - 1):
                m.write(zeros)
            m.write(bytes(4 * (n // 3) * 3 - (4 * n // len(zeros) - 1) * len(zeros)))
    assert path.stat().st_size < 1 << 20
    assert peak_of(lambda: rnn_xp.load(path)) < 4 << 20


# -- configurations (both formats) ---------------------------------------------------------


def _set(key, value):
    return lambda c: c | {key: value}


def _drop(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


BAD_CONFIGS = [
    ("list", lambda c: [c], "the configuration is a list; expected a JSON object"),
    ("number", lambda c: 3.5, "the configuration is a number; expected a JSON object"),
    ("no format", _drop("format"), "the configuration has no format; expected format 1"),
    ("newer", _set("format", 2), "was written by a newer rnn-xp (format 2); this version reads"),
    ("format text", _set("format", "1"), "format is '1'; expected a positive integer"),
    ("format 0", _set("format", 0), "format is 0; expected a positive integer"),
    ("missing", _drop("hidden_size"), "the configuration's keys: missing ['hidden_size']"),
    ("unknown key", _set("colour", "red"), "the configuration's keys: unexpected ['colour']"),
    ("size text", _set("hidden_size", "10"), "hidden_size is '10'; expected a positive integer"),
    ("size bool", _set("input_size", True), "input_size is True; expected a positive integer"),
    ("size float", _set("num_layers", 1.0), "num_layers is 1.0; expected a positive integer"),
    ("size 0", _set("hidden_size", 0), "hidden_size is 0; expected a positive integer"),
    ("size < 0", _set("input_size", -3), "input_size is -3; expected a positive integer"),
    ("size null", _set("input_size", None), "input_size is None; expected a positive integer"),
    ("huge H", _set("hidden_size", 10**12), "weight_ih_l0 has shape (8, 3); expected (4000000"),
    ("huge L", _set("num_layers", 10**9), "holds 8 parameter arrays; expected 8000000000 for"),
    ("huge D", _set("input_size", 10**30), "weight_ih_l0 has shape (8, 3); expected (8, 10000"),
    ("mode list", _set("mode", ["lstm"]), "mode is ['lstm']; expected one of"),
    ("mode empty", _set("mode", ""), "mode is ''; expected one of 'rnn_tanh', 'rnn_relu', 'lstm'"),
    ("other mode", _set("mode", "gru"), "weight_ih_l0 has shape (8, 3); expected (6, 3) for gru"),
    ("dtype int", _set("dtype", "int32"), "dtype is 'int32'; expected one of 'float16', "),
    ("dtype bf16", _set("dtype", "bfloat16"), "dtype is 'bfloat16'; expected one of"),
    ("dtype 64", _set("dtype", "float64"), "weight_ih_l0 has dtype float32; expected float64"),
    ("dropout 1", _set("dropout", 1.0), "dropout is 1.0; expected a probability in [0, 1)"),
    ("dropout < 0", _set("dropout", -0.5), "dropout is -0.5; expected a probability"),
    ("dropout nan", _set("dropout", float("nan")), "dropout is nan; expected a probability"),
    ("dropout bool", _set("dropout", False), "dropout is False; expected a probability"),
    ("dropout text", _set("dropout", "0"), "dropout is '0'; expected a probability"),
    ("bias text", _set("bias", "yes"), "bias is 'yes'; expected true or false"),
    ("bidir int", _set("bidirectional", 1), "bidirectional is 1; expected true or false"),
    ("bf null", _set("batch_first", None), "batch_first is None; expected true or false"),
    ("tanh", _set("nonlinearity", "tanh"), "nonlinearity is 'tanh'; expected None for mode"),
    ("unidirectional", _set("bidirectional", False), "1 layer(s); unexpected ['bias_hh_l0_rev"),
    ("proj text", _set("proj_size", "1"), "proj_size is '1'; expected a non-negative integer"),
    ("proj bool", _set("proj_size", True), "proj_size is True; expected a non-negative integer"),
    ("proj < 0", _set("proj_size", -1), "proj_size is -1; expected a non-negative integer"),
    ("proj float", _set("proj_size", 1.0), "proj_size is 1.0; expected a non-negative integer"),
    ("proj = H", _set("proj_size", 2), "proj_size is 2; expected less than hidden_size (2)"),
    ("proj huge", _set("proj_size", 10**12), "proj_size is 1000000000000; expected less than"),
    (
        "proj gru",
        lambda c: c | {"mode": "gru", "proj_size": 1},
        "proj_size is 1; expected 0 for mode 'gru': only mode 'lstm' has projections",
    ),
    (
        "proj 1",
        _set("proj_size", 1),
        "hidden_size 2, proj_size 1, 1 layer(s), bidirectional; missing ['weight_hr_l0', 'weight_h",
    ),
    ("proj key", _set("proj", 1), "the configuration's keys: unexpected ['proj']"),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    ("change", "fragment"), [pytest.param(c, f, id=i) for i, c, f in BAD_CONFIGS]
)
def test_bad_configurations(tmp_path, suffix, change, fragment):
    needs(suffix)
    write_model_file(tmp_path / f"w{suffix}", change(dict(CONFIG)))
    expect_error(rnn_xp.load, tmp_path / f"w{suffix}", fragment)
    expect_error(io.load_extra, tmp_path / f"w{suffix}", fragment)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    "text", ["", "{", "{'mode': 'lstm'}", "[" * 100_000, "1" * 5000, '{"a": 1, "a": 2} x']
)
def test_configurations_that_are_not_json(tmp_path, suffix, text):
    needs(suffix)
    write_model_file(tmp_path / f"w{suffix}", text)
    expect_error(rnn_xp.load, tmp_path / f"w{suffix}", "the configuration is not valid JSON")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_valid_changes_to_the_configuration_load(tmp_path, suffix):
    needs(suffix)
    path = tmp_path / f"w{suffix}"
    write_model_file(path, CONFIG | {"batch_first": True, "dropout": 0})
    model = rnn_xp.load(path)
    assert model.batch_first
    assert model.dropout == 0.0
    assert_same_state(model)
    write_model_file(path, CONFIG | {"proj_size": 0})  # the default, written out
    assert rnn_xp.load(path).proj_size == 0
    assert_same_state(rnn_xp.load(path))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("mode", ["transformer", "LSTM", "rnn", "x" * 500])
def test_a_mode_that_is_not_built_in_asks_for_its_cell(tmp_path, suffix, mode):
    # The file may hold a user cell's parameters: only its cell can say; no other check fails.
    needs(suffix)
    path = tmp_path / f"w{suffix}"
    write_model_file(path, CONFIG | {"mode": mode})
    for call, name in ((rnn_xp.load, "load"), (io.load_extra, "load_extra")):
        with pytest.raises(WeightsError) as info:
            call(path)
        error = info.value
        assert error.argument == "cells"
        assert str(error) == f"cells: {error.detail}"
        assert "\n" not in str(error)
        assert repr(os.fspath(path)) in error.detail
        assert "is not a built-in one; pass its cell" in error.detail
        assert f"{name}(path, cells=MyCell())" in error.detail
        assert len(error.detail) < 300 + len(repr(os.fspath(path)))


# -- .safetensors -------------------------------------------------------------------------------


def st_header(**tensors) -> dict:
    return {"__metadata__": {"rnn_xp": json.dumps(CONFIG)}} | tensors


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x01\x02\x03", "is too short for a .safetensors file (3 bytes"),
        (struct.pack("<Q", 100) + b"{}", "claims a 100-byte header, but 2 bytes follow"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", "claims a 18446744073709551615-byte header"),
        (raw_safetensors(b"\xff\xfe{}", b""), "the header is not valid JSON"),
        (raw_safetensors(b"{not json}", b""), "the header is not valid JSON"),
        (raw_safetensors(b'{"a": 1, "a": 1}', b""), "not valid JSON (repeated key 'a')"),
        (raw_safetensors(b"[1, 2]", b""), "the header is a list; expected a JSON object"),
        (raw_safetensors(b"{}", b""), "has no rnn_xp configuration (no rnn_xp in its metadata)"),
        (
            raw_safetensors(b'{"__metadata__": {"rnn_xp": 3}}', b""),
            "the header's __metadata__ is not a map of strings",
        ),
        (
            raw_safetensors(b'{"__metadata__": [1]}', b""),
            "the header's __metadata__ is not a map of strings",
        ),
    ],
)
def test_safetensors_headers(tmp_path, data, fragment):
    needs(".safetensors")
    (tmp_path / "w.safetensors").write_bytes(data)
    expect_error(rnn_xp.load, tmp_path / "w.safetensors", fragment)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"dtype": "F32", "shape": [8, 3]}, "is not described by dtype, shape and data_offsets"),
        ("F32", "is not described by dtype, shape and data_offsets"),
        ({"dtype": "BF16", "shape": [8, 3], "data_offsets": [0, 48]}, "has dtype 'BF16'"),
        ({"dtype": "F32", "shape": [8, -3], "data_offsets": [0, 96]}, "has shape [8, -3]"),
        ({"dtype": "F32", "shape": [8, True], "data_offsets": [0, 32]}, "has shape [8, True]"),
        ({"dtype": "F32", "shape": "8x3", "data_offsets": [0, 96]}, "has shape '8x3'"),
        ({"dtype": "F32", "shape": [8, 3], "data_offsets": [96, 0]}, "has data_offsets [96, 0]"),
        ({"dtype": "F32", "shape": [8, 3], "data_offsets": [-96, 0]}, "has data_offsets"),
        ({"dtype": "F32", "shape": [8, 3], "data_offsets": [0]}, "has data_offsets [0]"),
        ({"dtype": "F32", "shape": [8, 3], "data_offsets": [0, 95]}, "takes 95 bytes"),
        ({"dtype": "F32", "shape": [8, 3], "data_offsets": [8, 104]}, "starts at data byte 8"),
        ({"dtype": "F32", "shape": [8, 3], "data_offsets": [0, 96]}, "describes 96 bytes"),
    ],
)
def test_safetensors_tensor_entries(tmp_path, entry, fragment):
    needs(".safetensors")
    header = json.dumps(st_header(weight_ih_l0=entry)).encode()
    (tmp_path / "w.safetensors").write_bytes(raw_safetensors(header, bytes(100)))
    expect_error(rnn_xp.load, tmp_path / "w.safetensors", fragment)


def test_safetensors_non_float_parameters(tmp_path):
    needs(".safetensors")
    state = STATE | {"weight_hh_l0": STATE["weight_hh_l0"].astype(np.int32)}
    write_model_file(tmp_path / "w.safetensors", CONFIG, state)
    expect_error(rnn_xp.load, tmp_path / "w.safetensors", "weight_hh_l0 has dtype int32")


def hide(monkeypatch, *modules: str) -> None:
    """Make ``import`` of ``modules`` fail, as when the package is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_safetensors_package_missing(tmp_path, monkeypatch, saved):
    path = tmp_path / "w.safetensors"
    path.write_bytes(saved.get(".safetensors") or safetensors_bytes(STATE, {"rnn_xp": "{}"}))
    hide(monkeypatch, "safetensors", "safetensors.numpy")
    for call in (rnn_xp.load, io.load_extra, lambda p: MODEL.save(p)):
        exc = expect_error(call, path, "needs the safetensors package; pip install 'rnn-xp[io]'")
        assert isinstance(exc, ImportError)
    assert not list(tmp_path.glob("*.partial*"))


# -- save -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_honour_the_umask(tmp_path, suffix, umask, mode):
    needs(suffix)
    old = os.umask(umask)
    try:
        MODEL.save(tmp_path / f"w{suffix}")
        MODEL.save(tmp_path / f"w{suffix}")  # over an existing file too
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / f"w{suffix}").stat().st_mode) == mode
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_to_bad_paths(tmp_path, suffix):
    needs(suffix)
    (tmp_path / f"d{suffix}").mkdir()
    expect_error(MODEL.save, tmp_path / f"d{suffix}", f"is a folder; expected a {suffix} file")
    expect_error(MODEL.save, tmp_path / "no" / f"w{suffix}", "the folder of", "does not exist")
    (tmp_path / "file").write_text("")
    expect_error(MODEL.save, tmp_path / "file" / f"w{suffix}", "does not exist")
    with pytest.raises(WeightsError, match=r"^path: expected a \.npz or \.safetensors file"):
        MODEL.save(tmp_path / "w.pt")
    if PERMISSIONS:
        (tmp_path / "ro").mkdir(mode=0o500)
        expect_error(MODEL.save, tmp_path / "ro" / f"w{suffix}", "cannot write", "denied")
    assert not list(tmp_path.rglob("*.partial*"))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_failed_save_leaves_nothing(tmp_path, suffix, monkeypatch):
    needs(suffix)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if suffix == ".npz":
        monkeypatch.setattr(np, "savez", full)
    else:
        import safetensors.numpy

        monkeypatch.setattr(safetensors.numpy, "save_file", full)
    expect_error(MODEL.save, tmp_path / f"w{suffix}", "cannot write", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_extras_that_would_be_pickled(tmp_path):
    with pytest.raises(TypeError, match=r"^extra: expected str keys and bool, integer or float"):
        MODEL.save(tmp_path / "w.npz", extra={"trap": np.array([Trap()], dtype=object)})
    with pytest.raises(TypeError, match=r"^extra: .* of dtype <U1"):
        MODEL.save(tmp_path / "w.npz", extra={"vocab": np.array(list("abc"))})
    assert list(tmp_path.iterdir()) == []


# -- fuzz: .npz and .safetensors -----------------------------------------------------------------


def check_outcome(path, extras: dict[str, np.ndarray], data_may_differ: bool = False) -> None:
    """`load` and `load_extra` return what was saved or raise a one-line WeightsError.

    ``data_may_differ``: bytes were changed where only tensor values live (a
    .safetensors file has no checksum), so the values may differ, not the shapes.
    """
    for call in (rnn_xp.load, io.load_extra):
        try:
            result, error = call(path), None
        except WeightsError as exc:
            error = exc
        if error is not None:
            # cells: a configuration that is right but for a mode that is not built in.
            assert error.argument == "path" or (
                error.argument == "cells" and "is not a built-in one" in error.detail
            )
            assert "\n" not in str(error)
            assert repr(os.fspath(path)) in error.detail
        elif call is rnn_xp.load:
            assert_same_state(result, values=not data_may_differ)
        else:
            assert result.keys() == extras.keys()
            for k, v in extras.items():
                assert (result[k].dtype, result[k].shape) == (v.dtype, v.shape)
                assert data_may_differ or result[k].tobytes() == v.tobytes()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_fuzz_every_truncation(tmp_path, saved, suffix):
    needs(suffix)
    data = saved[suffix]
    path = tmp_path / f"w{suffix}"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        for call in (rnn_xp.load, io.load_extra):
            expect_error(call, path)


def data_start(suffix: str, data: bytes) -> int:
    """Where bytes stop mattering to anything but tensor values (none, for a .npz)."""
    if suffix == ".npz":
        return len(data)  # every byte is covered by a CRC or checked
    return 8 + int.from_bytes(data[:8], "little")


EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.booleans(), st.integers(0, 2**32), st.integers(0, 255)),
        st.tuples(st.just("flip"), st.booleans(), st.integers(0, 2**32), st.integers(0, 7)),
        st.tuples(
            st.just("int"),
            st.booleans(),
            st.integers(0, 2**32),
            st.sampled_from([(2, 0), (2, 0xFFFF), (4, 0), (4, 2**31), (4, 2**32 - 1), (8, 2**63)]),
        ),
    ),
    min_size=1,
    max_size=6,
)


def apply_edits(data: bytes, edits) -> tuple[bytes, list[int]]:
    """``data`` edited in place (in its first 512 bytes, or anywhere); the positions touched."""
    out, touched = bytearray(data), []
    for kind, head, where, arg in edits:
        at = where % (min(512, len(out)) if head else len(out))
        if kind == "set":
            out[at] = arg
            touched.append(at)
        elif kind == "flip":
            out[at] ^= 1 << arg
            touched.append(at)
        else:
            width, value = arg
            at = min(at, len(out) - width)
            out[at : at + width] = value.to_bytes(width, "little")
            touched.extend(range(at, at + width))
    return bytes(out), touched


@pytest.mark.parametrize("suffix", SUFFIXES)
@settings(FUZZ, max_examples=400)
@given(edits=EDITS)
def test_fuzz_byte_edits(tmp_path, saved, suffix, edits):
    needs(suffix)
    data = saved[suffix]
    edited, touched = apply_edits(data, edits)
    path = tmp_path / f"w{suffix}"
    path.write_bytes(edited)
    start = data_start(suffix, data)
    check_outcome(path, EXTRAS, data_may_differ=any(at >= start for at in touched))


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
SIZES = st.integers(-2, 6) | st.sampled_from([10**12, 2**63, True, 2.0, "3", None])
FLAGS = st.booleans() | st.sampled_from([0, 1, None, "true"])
NEAR_VALID = {  # values around the valid ones, to get past the first checks
    "format": st.sampled_from([1, 2, 0, -1, "1", 1.0, None]),
    "mode": st.sampled_from([*rnn_xp.MODES, "LSTM", "rnn", ""]),
    "input_size": SIZES,
    "hidden_size": SIZES,
    "num_layers": SIZES,
    "bidirectional": FLAGS,
    "bias": FLAGS,
    "batch_first": FLAGS,
    "nonlinearity": st.sampled_from([None, "tanh", "relu", "sigmoid", ""]),
    "dropout": st.floats(-1, 2) | st.sampled_from([0, 1, True, None, "0.5", float("nan")]),
    "dtype": st.sampled_from([*io.DTYPES, "bfloat16", "int32", "float", None]),
    "proj_size": SIZES,
}


def changed(values) -> st.SearchStrategy:
    """The saved configuration with one to three values replaced by ``values[key]``."""
    # format last: hypothesis favours the first choices, and a bad format ends every check.
    order = sorted(io.CONFIG_KEYS + io.OPTIONAL_KEYS, key=lambda k: k == "format")
    keys = st.lists(st.sampled_from(order), min_size=1, max_size=3, unique=True)
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: values[k] for k in ks})).map(
        lambda changes: CONFIG | changes
    )


CONFIGS = st.one_of(
    changed(NEAR_VALID),
    changed(dict.fromkeys(io.CONFIG_KEYS + io.OPTIONAL_KEYS, JSON)),
    st.sets(st.sampled_from(io.CONFIG_KEYS), min_size=1, max_size=3).map(
        lambda keys: {k: v for k, v in CONFIG.items() if k not in keys}
    ),
    st.fixed_dictionaries(  # the right keys (or some), any values
        {"format": st.just(1)}, optional=dict.fromkeys(io.CONFIG_KEYS[1:], JSON)
    ),
    JSON,  # anything at all
    st.text(max_size=40),  # as the literal text of the configuration
)


@pytest.mark.parametrize("suffix", SUFFIXES)
@settings(FUZZ, max_examples=300)
@given(config=CONFIGS)
def test_fuzz_configurations(tmp_path, suffix, config):
    needs(suffix)
    path = tmp_path / f"w{suffix}"
    write_model_file(path, config)
    check_outcome(path, {})


# -- torch state_dict files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def torch_file(torch, tmp_path, obj, name="m.pt", **kwargs):
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def lstm_state(torch, **kwargs):
    torch.manual_seed(0)
    return torch.nn.LSTM(3, 2, **kwargs).state_dict()


def test_torch_checkpoint_is_unwrapped(tmp_path, torch):
    module = torch.nn.GRU(3, 2, num_layers=2, bidirectional=True)
    ckpt = {"state_dict": module.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}
    model = io.load_torch(torch_file(torch, tmp_path, ckpt))
    reference = rnn_xp.from_torch(module)
    for k, v in reference.state_dict().items():
        assert model.state_dict()[k].tobytes() == v.tobytes()


def test_torch_pickled_objects_are_refused_without_running(tmp_path, torch):
    path = torch_file(torch, tmp_path, Trap())
    expect_error(
        io.load_torch,
        path,
        f"holds a pickled {__name__}._trip, which torch.load(weights_only=True) refuses",
    )
    path = torch_file(torch, tmp_path, torch.nn.LSTM(3, 2))
    expect_error(
        io.load_torch,
        path,
        "holds a whole pickled module (torch.nn.modules.rnn.LSTM); save module.state_dict()",
    )
    assert not TRIPPED


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ([1, 2], "holds a list, not a state_dict (a dict of tensors)"),
        ({"weight_ih_l0": [1.0]}, "'weight_ih_l0' is a list; expected a tensor"),
        ({"weight_ih_l0": "w"}, "'weight_ih_l0' is a string; expected a tensor"),
    ],
)
def test_torch_files_that_are_not_state_dicts(tmp_path, torch, obj, fragment):
    expect_error(io.load_torch, torch_file(torch, tmp_path, obj), fragment)


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (
            lambda t: {k: v.long() for k, v in lstm_state(t).items()},
            "'weight_ih_l0' has dtype torch.int64; expected a float16, float32 or float64 tensor",
        ),
        (
            lambda t: {k: v.bfloat16() for k, v in lstm_state(t).items()},
            "has dtype torch.bfloat16; expected a float16, float32 or float64 tensor (convert",
        ),
        (
            lambda t: lstm_state(t) | {"weight_hh_l0": t.zeros(10, 4)},
            "weight_hh_l0 has shape (10, 4); expected (G*H, H) with G = 1 (RNN), 3 (GRU) or 4",
        ),
        (
            lambda t: lstm_state(t) | {"weight_hh_l0": t.zeros(0, 0)},
            "weight_hh_l0 (0, 0); expected (G*H, D) and (G*H, H) with D, H >= 1",
        ),
        (
            lambda t: lstm_state(t) | {"weight_hh_l0": t.zeros(8)},
            "expected (G*H, D) and (G*H, H)",
        ),
        (
            lambda t: lstm_state(t, num_layers=3, bias=False) | {"weight_ih_l1": t.zeros(8, 3)},
            "weight_ih_l1 has shape (8, 3); expected (8, 2) for lstm, input_size 3, hidden_size 2",
        ),
        (
            lambda t: _without(
                lstm_state(t, num_layers=3),
                *(f"{k}_l1" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
            ),
            "has parameters for layers [0, 2]; expected layers 0 to 2 without gaps",
        ),
        (
            lambda t: _without(
                lstm_state(t, num_layers=2, bidirectional=True),
                *(f"{k}_l1_reverse" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
            ),
            "has reverse (bidirectional) parameters for layers [0] only",
        ),
        (
            lambda t: _without(lstm_state(t, num_layers=2), "bias_ih_l1", "bias_hh_l1"),
            "2 layer(s); missing ['bias_hh_l1', 'bias_ih_l1']",
        ),
        (
            lambda t: lstm_state(t, proj_size=1) | {"weight_hr_l0": t.zeros(2, 2)},
            "weight_hr_l0 has shape (2, 2); expected (P, H) with 1 <= P < H, an LSTM's projections",
        ),
        (
            lambda t: lstm_state(t, proj_size=1) | {"weight_hr_l0": t.zeros(1)},
            "weight_hr_l0 has shape (1,); expected (P, H) with 1 <= P < H",
        ),
        (
            lambda t: lstm_state(t, proj_size=1) | {"weight_hh_l0": t.zeros(8, 2)},
            "weight_hh_l0 has shape (8, 2); expected (4*H, P) = (8, 1) for an LSTM with projections",
        ),
        (
            lambda t: _without(lstm_state(t, proj_size=1, num_layers=2), "weight_hr_l1"),
            "hidden_size 2, proj_size 1, 2 layer(s); missing ['weight_hr_l1']",
        ),
        (
            lambda t: _without(lstm_state(t, proj_size=1), "weight_hr_l0"),
            "weight_hh_l0 has shape (8, 1); expected (G*H, H) with G = 1 (RNN), 3 (GRU) or 4",
        ),
        (
            lambda t: (
                lstm_state(t, proj_size=1, bidirectional=True)
                | {"weight_ih_l0_reverse": t.zeros(8, 2)}
            ),
            "weight_ih_l0_reverse has shape (8, 2); expected (8, 3) for lstm, input_size 3, hidden",
        ),
        (
            lambda t: lstm_state(t) | {"fc.weight": t.zeros(2, 2), "steps": t.tensor(3)},
            "has keys ['fc.weight', 'steps'] that are not torch.nn.RNN, LSTM or GRU parameters",
        ),
        (
            lambda t: {"rnn." + k: v for k, v in lstm_state(t).items()},
            "belong to a larger module: save the RNN's own state_dict",
        ),
        (
            lambda t: lstm_state(t) | {"weight_ih_l0": lstm_state(t)["weight_ih_l0"].double()},
            "mixes dtypes float32, float64; expected one",
        ),
        (lambda t: {}, "lacks weight_ih_l0 or weight_hh_l0; expected both"),
    ],
)
def test_torch_impossible_state_dicts(tmp_path, torch, make, fragment):
    expect_error(io.load_torch, torch_file(torch, tmp_path, make(torch)), fragment)


def test_torch_mode_problems_name_the_mode(tmp_path, torch):
    path = torch_file(torch, tmp_path, torch.nn.RNN(3, 2).state_dict())
    for mode, fragment in [
        (None, "give --mode rnn_tanh or --mode rnn_relu in "),
        ("lstm", "'lstm' does not match a state_dict with 1 gate(s) in "),
        ("elman", "expected None or one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru', got 'elman'"),
        ("lstm_peephole", "got 'lstm_peephole' (torch has no such module)"),
    ]:
        with pytest.raises(WeightsError) as info:
            io.load_torch(path, mode=mode)
        assert info.value.argument == "mode"
        assert fragment in info.value.detail
    assert io.load_torch(path, mode="rnn_relu").mode == "rnn_relu"


def test_infer_config_checks_its_state():
    with pytest.raises(WeightsError, match=r"^state: the state_dict is a list; expected a dict"):
        io.infer_config([1])
    with pytest.raises(WeightsError, match=r"^state: the state_dict: weight_ih_l0 is a list"):
        io.infer_config({"weight_ih_l0": [1.0], "weight_hh_l0": [1.0]})
    state = {"weight_ih_l0": np.zeros((8, 3)), "weight_hh_l0": np.zeros((8, 2))}
    assert io.infer_config(state) | {"dtype": "float64"} == io.infer_config(state)
    with pytest.raises(WeightsError, match=r"^state: .* no bias; missing \['weight_ih_l1'\]$"):
        io.infer_config(state | {"weight_hh_l1": np.zeros((8, 2))})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is empty (0 bytes)"),
        (b"hello", "is not a torch.save file of torch >= 1.6 (a zip archive)"),
        (b"PK\x03\x04" + bytes(40), "is not a readable torch.save file (damaged, truncated"),
    ],
)
def test_torch_files_of_other_kinds(tmp_path, torch, content, fragment):
    (tmp_path / "m.pt").write_bytes(content)
    expect_error(io.load_torch, tmp_path / "m.pt", fragment)


def test_torch_script_archive(tmp_path, torch):
    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Identity()), path)
    expect_error(
        io.load_torch, path, "is a TorchScript archive (torch.jit.save), not a state_dict"
    )


def test_torch_reads_an_npz_or_legacy_file_as_not_torch(tmp_path, torch, saved):
    (tmp_path / "m.pt").write_bytes(saved[".npz"])
    expect_error(io.load_torch, tmp_path / "m.pt", "is a zip archive but not a torch.save file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = torch_file(torch, tmp_path, lstm_state(torch), _use_new_zipfile_serialization=False)
    expect_error(io.load_torch, path, "saved by an older torch (load and save it again)")
    expect_error(io.load_torch, tmp_path / "missing.pt", "no such file")


def rezip(path, change=lambda name, data: data, method=zipfile.ZIP_STORED) -> None:
    """Rewrite the zip archive at ``path``, each member's data through ``change``."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: change(i.filename, z.read(i)) for i in z.infolist()}
    write_zip(path, members, method)


def test_torch_compressed_records_are_refused(tmp_path, torch):
    # torch reads records in place (mmap=True): a deflated one would be read as data.
    path = torch_file(torch, tmp_path, lstm_state(torch))
    rezip(path, method=zipfile.ZIP_DEFLATED)
    expect_error(
        io.load_torch,
        path,
        "member 'm/data.pkl' is compressed; torch.save stores its records as they are",
    )


def test_torch_huge_storage_claim_allocates_nothing(tmp_path, torch):
    """A pickle claiming a 1 TiB storage and a (2**37, 2) tensor over 64 bytes of data."""
    state = {"weight_ih_l0": torch.zeros(8, 3), "weight_hh_l0": torch.zeros(8, 2)}
    path = torch_file(torch, tmp_path, state)

    def claim(name, data):
        if not name.endswith("data.pkl"):
            return data
        # Storage '1' holds 16 elements (BININT1 16 closing its persistent id),
        # and the tensor over it has size (8, 2): claim 2**38 elements and size
        # (2**37, 2) instead, as LONG1 opcodes.
        data, storages = re.subn(
            rb"(X\x01\x00\x00\x001.{0,8}?)K\x10t",
            lambda m: m[1] + b"\x8a\x08" + (2**38).to_bytes(8, "little") + b"t",
            data,
            flags=re.DOTALL,
        )
        data, sizes = re.subn(
            rb"K\x00K\x08K\x02\x86",
            b"K\x00\x8a\x08" + (2**37).to_bytes(8, "little") + b"K\x02\x86",
            data,
        )
        if (storages, sizes) != (1, 1):
            pytest.skip("this torch version pickles a state_dict differently")
        return data

    rezip(path, claim)
    exc = expect_error(io.load_torch, path, "is not a readable torch.save file")
    assert "allocate" not in exc.detail


def test_torch_missing(tmp_path, monkeypatch):
    (tmp_path / "m.pt").write_bytes(b"PK\x03\x04")
    hide(monkeypatch, "torch")
    exc = expect_error(
        io.load_torch, tmp_path / "m.pt", "needs PyTorch; pip install 'rnn-xp[torch]'"
    )
    assert isinstance(exc, ImportError)


def test_fuzz_torch_truncations(tmp_path, torch):
    data = torch_file(torch, tmp_path, lstm_state(torch, bidirectional=True)).read_bytes()
    path = tmp_path / "t.pt"
    for n in [*range(0, 64), *range(64, len(data), 13), *range(len(data) - 64, len(data))]:
        path.write_bytes(data[:n])
        expect_error(io.load_torch, path)


@settings(FUZZ, max_examples=150)
@given(edits=EDITS)
def test_fuzz_torch_byte_edits(tmp_path, torch, edits):
    state = lstm_state(torch, bidirectional=True)
    path = tmp_path / "m.pt"
    if not path.exists():
        torch.save(state, path)
    edited, _ = apply_edits(path.read_bytes(), edits)
    (tmp_path / "e.pt").write_bytes(edited)
    try:
        model, error = io.load_torch(tmp_path / "e.pt"), None
    except WeightsError as exc:
        error = exc
    if error is not None:
        assert error.argument in ("path", "mode")
        assert "\n" not in str(error)
        return
    # torch's zip records carry no checksum that torch checks: values may differ.
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }


def test_torch_views_that_repeat_their_storage_are_refused_before_copying(tmp_path, torch):
    # 18 KB of file holding one float each, expanded to (2048, 16384): a copy
    # would take 128 MB per tensor. The tensors' bytes must fit in the file.
    big = torch.zeros(1).expand(4 * 512, 16384)
    state = {"weight_ih_l0": big, "weight_hh_l0": torch.zeros(1).expand(4 * 512, 512)}
    path = tmp_path / "m.pt"
    torch.save(state, path)
    tracemalloc.start()
    try:
        expect_error(io.load_torch, path, "views that repeat their storage")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_torch_tensors_tied_under_two_names_load(tmp_path, torch):
    # One tensor under two names is one view: copied once, counted once.
    module = torch.nn.LSTM(3, 4, bidirectional=True)
    module.weight_ih_l0_reverse = module.weight_ih_l0
    module.weight_hh_l0_reverse = module.weight_hh_l0
    path = tmp_path / "m.pt"
    torch.save(module.state_dict(), path)
    model = io.load_torch(path)
    state = model.state_dict()
    np.testing.assert_array_equal(state["weight_ih_l0_reverse"], state["weight_ih_l0"])
    np.testing.assert_array_equal(state["weight_ih_l0"], module.weight_ih_l0.detach().numpy())
