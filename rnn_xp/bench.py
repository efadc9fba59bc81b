"""The benchmark suite: ``python -m rnn_xp bench``.

For each size (N, T, D, H), dtype and cell kind it times, in one process and
interleaved (round robin, best of R rounds, so that a noisy neighbour slows every
contender alike; a call shorter than 20 ms is timed as the mean of enough
back-to-back calls to fill 20 ms, after one untimed call):

* ``limit``: the same GEMMs alone, in NumPy, into preallocated buffers: the
  input projection plus T recurrent products forward; backward adds T recurrent
  products and the dWx, dWh and dxs products;
* ``rnn_xp numpy``: the sequence functions on NumPy arrays (forward in
  inference mode, and forward + analytic backward);
* ``notebook``: the seed notebook's own `RNNLayer` loop (Elman forward only);
* ``torch.nn``: ``torch.nn.RNN``/``LSTM``/``GRU`` on the CPU, forward under
  ``no_grad`` and forward + backward through autograd, same thread count;
* ``rnn_xp torch``: rnn_xp on torch CPU tensors (forward; forward + analytic
  backward);
* ``rnn_xp jax``: rnn_xp on JAX arrays under ``jax.jit`` (forward; forward +
  analytic backward), compiled before timing.

It prints best-of-R milliseconds, GFLOP/s and the ratio to ``limit`` and to
``torch.nn``, and, with ``--memory``, the tracemalloc peak of NumPy inference and
training forwards. ``--gpu`` times rnn_xp on CuPy and on torch CUDA against
``torch.nn`` (cuDNN) instead, float32 in two tables: the FP32 table with IEEE
float32 everywhere (cuDNN's TF32 off) and the TF32 table with TF32 allowed to
every contender. Contenders whose library is missing are left out with a note.

``--precision bf16-mixed`` (or ``16-mixed``) adds, in float32 tables, rnn_xp's
`Recurrent` under that mixed-precision policy on torch and JAX (``rnn_xp torch
bf16-mixed``, ``rnn_xp jax bf16-mixed``) and ``torch.nn`` under
``torch.autocast`` to the format: beside the float32 rows, their ratio is the
policy's gain. With ``--gpu`` the ``bf16-mixed`` rows are on by default (torch
CUDA and, where JAX sees a GPU, JAX); ``--precision 32-true`` leaves them out.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence

import numpy as np

import rnn_xp
from rnn_xp import _argtypes
from rnn_xp.precision import float32_matmul

KINDS = {"rnn_tanh": 1, "lstm": 4, "gru": 3}
NOTEBOOK = (32, 16, 100, 100)
SIZES = [NOTEBOOK, (64, 64, 256, 256), (256, 64, 512, 512)]
T_SWEEP = [(64, T, 256, 256) for T in (16, 64, 256)]
N_SWEEP = [(N, 64, 256, 256) for N in (16, 64, 256)]
SMOKE = [(3, 4, 5, 6)]
GPU_SIZES = [NOTEBOOK, (1024, 128, 1024, 1024)]
GPU_PRECISIONS = [
    ("ieee", "  FP32 table: IEEE float32 in every contender (TF32 off in cuBLAS, cuDNN, CuPy)"),
    ("tf32", "  TF32 table: every contender allowed TF32 (cuBLAS, cuDNN's RNNs, CuPy)"),
]
"""On the GPU, float32 is timed twice, like with like (`rnn_xp.precision`)."""


def flops(kind: str, N: int, T: int, D: int, H: int, backward: bool) -> float:
    """Matrix-product FLOPs: forward 2*N*T*G*H*(D + H); backward twice that again."""
    fwd = 2.0 * N * T * KINDS[kind] * H * (D + H)
    return 3 * fwd if backward else fwd


def problem(kind: str, N: int, T: int, D: int, H: int, dtype: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    G = KINDS[kind] * H
    return {
        "xs": rng.standard_normal((N, T, D)).astype(dtype),
        "Wx": (rng.uniform(-1, 1, (D, G)) / np.sqrt(H)).astype(dtype),
        "Wh": (rng.uniform(-1, 1, (H, G)) / np.sqrt(H)).astype(dtype),
        "b": (rng.uniform(-1, 1, G) / np.sqrt(H)).astype(dtype),
        "dhs": rng.standard_normal((N, T, H)).astype(dtype),
    }


# -- contenders ----------------------------------------------------------------
# Each returns {(label, with_backward): callable} for one kind and problem.


def _forward_backward(kind: str, a: dict, backward: bool, inference: bool = False):
    """rnn_xp's sequence function of ``kind`` on whatever arrays ``a`` holds."""
    xs, Wx, Wh, b = a["xs"], a["Wx"], a["Wh"], a["b"]
    if kind == "rnn_tanh":
        hs, _ = rnn_xp.rnn_forward(xs, Wx, Wh, b)
        return rnn_xp.rnn_backward(a["dhs"], xs, hs, Wx, Wh, b) if backward else hs
    if kind == "lstm":
        hs, _, _, cache = rnn_xp.lstm_forward(xs, Wx, Wh, b, inference=inference)
        return rnn_xp.lstm_backward(a["dhs"], cache) if backward else hs
    hs, _, cache = rnn_xp.gru_forward(xs, Wx, Wh, b, b, inference=inference)
    return rnn_xp.gru_backward(a["dhs"], cache) if backward else hs


def limit(kind: str, a: dict) -> dict:
    xs, Wx, Wh = a["xs"], a["Wx"], a["Wh"]
    N, T, D = xs.shape
    H, G = Wh.shape
    x2 = np.ascontiguousarray(xs.reshape(N * T, D))
    ax, step, back = (
        np.empty((N * T, G), xs.dtype),
        np.empty((N, G), xs.dtype),
        np.empty((N, H), xs.dtype),
    )
    h, dt = np.zeros((N, H), xs.dtype), np.zeros((N, G), xs.dtype)
    WhT, WxT = np.ascontiguousarray(Wh.T), np.ascontiguousarray(Wx.T)
    dt2, hp2 = np.zeros((N * T, G), xs.dtype), np.zeros((N * T, H), xs.dtype)
    dWx, dWh, dx2 = (
        np.empty((D, G), xs.dtype),
        np.empty((H, G), xs.dtype),
        np.empty((N * T, D), xs.dtype),
    )

    def forward():
        np.matmul(x2, Wx, out=ax)
        for _ in range(T):
            np.matmul(h, Wh, out=step)

    def forward_backward():
        forward()
        for _ in range(T):
            np.matmul(dt, WhT, out=back)
        np.matmul(x2.T, dt2, out=dWx)
        np.matmul(hp2.T, dt2, out=dWh)
        np.matmul(dt2, WxT, out=dx2)

    return {("limit", False): forward, ("limit", True): forward_backward}


def rnn_xp_numpy(kind: str, a: dict) -> dict:
    return {
        ("rnn_xp numpy", False): lambda: _forward_backward(kind, a, False, inference=True),
        ("rnn_xp numpy", True): lambda: _forward_backward(kind, a, True),
    }


def notebook(kind: str, a: dict) -> dict:
    if kind != "rnn_tanh":
        return {}
    xs, Wx, Wh, b = a["xs"], a["Wx"], a["Wh"], a["b"]

    def run():  # the seed notebook's RNNLayer.forward, as written there
        N, T, _ = xs.shape
        H = Wx.shape[1]
        hs = np.empty((N, T, H), dtype="f")
        h = np.zeros((N, H), dtype="f")
        for t in range(T):
            h = np.tanh(np.dot(h, Wh) + np.dot(xs[:, t, :], Wx) + b)
            hs[:, t, :] = h
        return hs

    return {("notebook", False): run}


def torch_nn(kind: str, a: dict, device: str = "cpu") -> dict:
    import torch

    D, H = a["xs"].shape[2], a["Wh"].shape[0]
    cls = {"rnn_tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    dtype = getattr(torch, str(a["xs"].dtype))
    module = cls(D, H, batch_first=True, dtype=dtype, device=device)
    xs = torch.asarray(a["xs"], device=device).requires_grad_(True)
    dhs = torch.asarray(a["dhs"], device=device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def forward():
        with torch.no_grad():
            module(xs)
        sync()

    def forward_backward():
        module.zero_grad(set_to_none=True)
        xs.grad = None
        out, _ = module(xs)
        out.backward(dhs)
        sync()

    label = "torch.nn" if device == "cpu" else "torch.nn cudnn"
    return {(label, False): forward, (label, True): forward_backward}


def rnn_xp_torch(kind: str, a: dict, device: str = "cpu") -> dict:
    import torch

    t = {k: torch.asarray(v, device=device) for k, v in a.items()}
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def run(backward):
        def f():
            with torch.no_grad():
                _forward_backward(kind, t, backward, inference=not backward)
            sync()

        return f

    label = "rnn_xp torch" if device == "cpu" else "rnn_xp torch cuda"
    return {(label, False): run(False), (label, True): run(True)}


def rnn_xp_jax(kind: str, a: dict) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    j = {k: jax.numpy.asarray(v) for k, v in a.items()}
    fwd = jax.jit(lambda arrays: _forward_backward(kind, arrays, False, inference=True))
    both = jax.jit(lambda arrays: _forward_backward(kind, arrays, True))
    return {
        ("rnn_xp jax", False): lambda: jax.block_until_ready(fwd(j)),
        ("rnn_xp jax", True): lambda: jax.block_until_ready(both(j)),
    }


def rnn_xp_jax_autodiff(kind: str, a: dict) -> dict:
    """``jax.grad`` through rnn_xp's forward on JAX: the gradient `backward` could have used."""
    import jax

    jax.config.update("jax_enable_x64", True)
    j = {k: jax.numpy.asarray(v) for k, v in a.items()}

    def loss(xs, Wx, Wh, b):
        arrays = {"xs": xs, "Wx": Wx, "Wh": Wh, "b": b}
        return jax.numpy.sum(_forward_backward(kind, arrays, False) * j["dhs"])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    args = [j[k] for k in ("xs", "Wx", "Wh", "b")]
    return {("rnn_xp jax autodiff", True): lambda: jax.block_until_ready(grad(*args))}


def _gate_blocks(a: dict, kind: str) -> tuple[list, list, list, list]:
    """``a``'s weights cut into per-gate blocks in torch's order: Wx, Wh, bx, bh columns."""
    H = a["Wh"].shape[0]
    G = a["Wh"].shape[1] // H
    cut = lambda w: [w[..., g * H : (g + 1) * H] for g in range(G)]  # noqa: E731
    bx = cut(a["b"])  # bench's GRU runs with bx = bh = b; the LSTM's one b is bx
    bh = cut(a["b"]) if kind == "gru" else [0 * b for b in bx]
    return cut(a["Wx"]), cut(a["Wh"]), bx, bh


def _float32_peer(a: dict, name: str) -> None:
    """`Unavailable` unless ``a`` is float32: the peers' cells and scans are float32 ones."""
    if a["xs"].dtype != np.float32:
        raise Unavailable(f"{name} is timed in float32 only, not {a['xs'].dtype}")


def _jax_peer(label: str, forward: Callable, params: object, a: dict) -> dict:
    """A JAX peer's contenders: ``forward(params, xs)`` and the gradient, both jitted.

    The gradient is ``jax.grad`` of ``sum(out * dhs)`` with respect to ``params``
    and ``xs``, as rnn_xp's backward gives them all.
    """
    import jax

    jnp = jax.numpy
    xs, dhs = jnp.asarray(a["xs"]), jnp.asarray(a["dhs"])
    fwd = jax.jit(forward)
    loss = lambda p, x: jnp.sum(forward(p, x) * dhs)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return {
        (label, False): lambda: jax.block_until_ready(fwd(params, xs)),
        (label, True): lambda: jax.block_until_ready(grad(params, xs)),
    }


def flax_linen(kind: str, a: dict) -> dict:
    """Flax's ``nn.RNN`` of ``OptimizedLSTMCell`` or ``GRUCell``, under ``jax.jit``.

    Loaded with the problem's weights, so it computes rnn_xp's forward; the
    gradient as `_jax_peer` takes it.
    """
    import jax
    from flax import linen as nn

    if kind not in ("lstm", "gru"):
        return {}
    _float32_peer(a, "flax")
    jnp = jax.numpy
    H = a["Wh"].shape[0]
    Wx, Wh, bx, bh = _gate_blocks(a, kind)
    if kind == "lstm":
        cell, params = nn.OptimizedLSTMCell(H), {}
        for g, name in enumerate("ifgo"):
            params[f"i{name}"] = {"kernel": Wx[g]}
            params[f"h{name}"] = {"kernel": Wh[g], "bias": bx[g] + bh[g]}
    else:  # Flax's GRU: r, z with one summed bias; n's input and hidden biases apart
        cell = nn.GRUCell(H)
        params = {
            "ir": {"kernel": Wx[0], "bias": bx[0] + bh[0]},
            "iz": {"kernel": Wx[1], "bias": bx[1] + bh[1]},
            "in": {"kernel": Wx[2], "bias": bx[2]},
            "hr": {"kernel": Wh[0]},
            "hz": {"kernel": Wh[1]},
            "hn": {"kernel": Wh[2], "bias": bh[2]},
        }
    variables = jax.tree_util.tree_map(jnp.asarray, {"params": {"cell": params}})
    return _jax_peer("flax", nn.RNN(cell).apply, variables, a)


def keras_jax(kind: str, a: dict) -> dict:
    """Keras 3's ``LSTM`` or ``GRU`` layer on the JAX backend, under ``jax.jit``.

    Its ``stateless_call`` with the problem's weights (the GRU's ``reset_after``
    is torch's form); the gradient as `_jax_peer` takes it. Unavailable where Keras
    was imported on another backend (``KERAS_BACKEND``).
    """
    if kind not in ("lstm", "gru"):
        return {}
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise Unavailable(f"Keras runs on {keras.backend.backend()}; KERAS_BACKEND=jax runs it")
    _float32_peer(a, "keras")
    N, T, D = a["xs"].shape
    H = a["Wh"].shape[0]
    Wx, Wh, bx, bh = _gate_blocks(a, kind)
    if kind == "lstm":  # Keras' gate order i, f, c, o is torch's
        layer = keras.layers.LSTM(H, return_sequences=True)
        weights = [a["Wx"], a["Wh"], a["b"]]
    else:  # Keras' z, r, h against torch's r, z, n; bias rows: input, recurrent
        layer = keras.layers.GRU(H, return_sequences=True)
        order = [1, 0, 2]
        cat = lambda blocks: np.concatenate([blocks[g] for g in order], axis=-1)  # noqa: E731
        weights = [cat(Wx), cat(Wh), np.stack([cat(bx), cat(bh)])]
    layer.build((N, T, D))
    fixed = [v.value for v in layer.non_trainable_variables]

    def forward(trainable, x):
        return layer.stateless_call(trainable, fixed, x)[0]

    return _jax_peer("keras jax", forward, [jax.numpy.asarray(w) for w in weights], a)


def rnn_xp_cupy(kind: str, a: dict) -> dict:
    import cupy

    c = {k: cupy.asarray(v) for k, v in a.items()}

    def run(backward):
        def f():
            _forward_backward(kind, c, backward, inference=not backward)
            cupy.cuda.get_current_stream().synchronize()

        return f

    return {("rnn_xp cupy", False): run(False), ("rnn_xp cupy", True): run(True)}


def _model(kind: str, a: dict, like: object):
    """A one-layer `Recurrent` of ``kind`` of ``a``'s sizes, batch-first, on ``like``'s library."""
    D, H = a["xs"].shape[2], a["Wh"].shape[0]
    return rnn_xp.Recurrent(kind, D, H, batch_first=True, seed=0, like=like)


def rnn_xp_torch_mixed(kind: str, a: dict, policy: str, device: str = "cpu") -> dict:
    """rnn_xp's `Recurrent` on torch tensors under the mixed-precision ``policy``."""
    import torch

    xs, dhs = (torch.asarray(a[k], device=device) for k in ("xs", "dhs"))
    model = _model(kind, a, xs)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def run(backward):
        def f():
            with torch.no_grad():
                model.forward(xs, inference=not backward, precision=policy)
                if backward:
                    model.backward(dhs)
            sync()

        return f

    label = f"rnn_xp torch {policy}" if device == "cpu" else f"rnn_xp cuda {policy}"
    return {(label, False): run(False), (label, True): run(True)}


def rnn_xp_jax_mixed(kind: str, a: dict, policy: str) -> dict:
    """rnn_xp's `Recurrent` on JAX arrays under ``policy``, under ``jax.jit``."""
    import jax

    j = {k: jax.numpy.asarray(v) for k, v in a.items()}
    model = _model(kind, a, j["xs"])

    def both(xs, dhs):
        model.forward(xs, precision=policy)
        return model.backward(dhs), model.grads

    fwd = jax.jit(lambda xs: model.forward(xs, inference=True, precision=policy)[0])
    grad = jax.jit(both)
    return {
        (f"rnn_xp jax {policy}", False): lambda: jax.block_until_ready(fwd(j["xs"])),
        (f"rnn_xp jax {policy}", True): lambda: jax.block_until_ready(grad(j["xs"], j["dhs"])),
    }


class Unavailable(Exception):
    """A contender that cannot run here; its message says why (printed as a note)."""


def torch_nn_autocast(kind: str, a: dict, policy: str, device: str = "cpu") -> dict:
    """``torch.nn`` under ``torch.autocast`` to the policy's format."""
    import torch

    from rnn_xp.precision import POLICIES

    fmt = getattr(torch, POLICIES[policy])
    plain = torch_nn(kind, a, device)

    def autocast(f):
        def g():
            with torch.autocast(device.split(":")[0], fmt):
                f()

        return g

    label = "torch.nn autocast" if device == "cpu" else "torch.nn cudnn autocast"
    fns = {(f"{label} {POLICIES[policy]}", b): autocast(f) for (_, b), f in plain.items()}
    try:  # torch 2.13's CPU LSTM (oneDNN) has no float16 autocast with autograd, for one
        for f in fns.values():
            f()
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:120]
        raise Unavailable(
            f"torch.nn under {POLICIES[policy]} autocast on {device}: {first}"
        ) from exc
    return fns


JAX_PEERS = ("flax", "keras jax")
"""The JAX libraries' own RNNs: the ``/jax peer`` column is a time over the faster of them."""

CPU_CONTENDERS: list[Callable] = [
    limit,
    rnn_xp_numpy,
    notebook,
    torch_nn,
    rnn_xp_torch,
    rnn_xp_jax,
    rnn_xp_jax_autodiff,
    flax_linen,
    keras_jax,
]
_MIXED: list[Callable] = [rnn_xp_torch_mixed, torch_nn_autocast, rnn_xp_jax_mixed]
"""The rows of ``--precision``: a policy's own, and torch.nn's under autocast."""


# -- timing ----------------------------------------------------------------------


def best_of(
    fns: dict[str, Callable],
    rounds: int,
    budget_s: float,
    min_time_s: float = 0.02,
    settle_s: float = 0.0,
) -> dict[str, float]:
    """Round-robin best-of-``rounds`` seconds per call of each function.

    Odd rounds go through the functions in reverse order. A function faster
    than ``min_time_s`` is timed over as many back-to-back calls as fill that
    time, after one untimed call: switching between libraries leaves the other
    library's worker threads spinning for a moment, and a lone sub-millisecond
    call would time that instead of itself.

    ``settle_s`` > 0 sleeps that long before each function's turn, and always
    makes the untimed call: for contenders with thread pools of their own
    (ONNX Runtime, OpenBLAS, torch), whose threads spin after a call (OpenBLAS
    for up to ~0.1 s) and take a core from whichever runs next.
    """
    calls = {}
    for label, f in fns.items():
        f()  # warm-up: imports, compilation, first-touch allocations
        t0 = time.perf_counter()
        f()
        calls[label] = max(1, math.ceil(min_time_s / max(time.perf_counter() - t0, 1e-7)))
    best = dict.fromkeys(fns, float("inf"))
    start = time.perf_counter()
    order = list(fns.items())
    for r in range(rounds):
        # Every other round runs backwards: a contender timed right after
        # another one of the same library runs on its warm threads and freed
        # memory, and came out up to 16% faster than the same code timed first.
        for label, f in order if r % 2 == 0 else order[::-1]:
            n = calls[label]
            if settle_s > 0:
                time.sleep(settle_s)
            if n > 1 or settle_s > 0:
                f()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best[label] = min(best[label], (time.perf_counter() - t0) / n)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return best


def peak_bytes(f: Callable) -> int:
    """tracemalloc's peak during ``f()``, after one untraced call (lazy imports, caches)."""
    f()
    tracemalloc.start()
    tracemalloc.reset_peak()
    f()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def table(
    kind: str,
    size: tuple,
    dtype: str,
    contenders: Sequence[Callable],
    rounds: int,
    budget_s: float,
    label: str = "",
    settle_s: float = 0.0,
) -> list[str]:
    a = problem(kind, *size, dtype)
    fns, notes = {}, []
    for make in contenders:
        try:
            found = make(kind, a)
        except (ImportError, Unavailable) as exc:
            notes.append(f"{make.__name__}: skipped ({exc})")
            continue
        fns.update(found)
    timings = best_of(fns, rounds, budget_s, settle_s=settle_s)
    lines = [f"\n{kind}  N={size[0]} T={size[1]} D={size[2]} H={size[3]}  {dtype}{label}"]
    head = f"{'best ms':>10}{'GFLOP/s':>10}{'/limit':>9}{'/torch.nn':>11}"
    jax_peers = any(name in JAX_PEERS for name, _ in timings)
    if jax_peers:
        head += f"{'/jax peer':>10}"
    lines.append(f"  {'contender':<30}{'pass':<9}{head}")
    nan = float("nan")
    for (label, backward), t in timings.items():
        ref = {name: timings[name, b] for name, b in timings if b == backward}
        lim = ref.get("limit") or ref.get("rnn_xp cupy")
        peer = ref.get("torch.nn") or ref.get("torch.nn cudnn")
        fastest = min((ref[name] for name in JAX_PEERS if name in ref), default=None)
        gf = flops(kind, *size, backward) / t / 1e9
        lines.append(
            f"  {label:<30}{'fwd+bwd' if backward else 'fwd':<9}{1e3 * t:>10.3f}{gf:>10.1f}"
            f"{t / lim if lim else nan:>9.2f}{t / peer if peer else nan:>11.2f}"
            + (f"{t / fastest if fastest else nan:>10.2f}" if jax_peers else "")
        )
    lines += [f"  note: {n}" for n in notes]
    return lines


def memory_lines(size: tuple, dtype: str) -> list[str]:
    lines = [f"\nNumPy tracemalloc peak, N={size[0]} T={size[1]} D={size[2]} H={size[3]} {dtype}"]
    for kind, G in KINDS.items():
        a = problem(kind, *size, dtype)
        N, T, _, H = size
        item = np.dtype(dtype).itemsize
        out, proj, state = N * T * H * item, N * T * G * H * item, N * H * item
        weights = (size[2] + H) * G * H * item
        infer, train = (
            peak_bytes(lambda k=kind, a=a, i=i: _forward_backward(k, a, False, inference=i))
            for i in (True, False)
        )
        lines.append(
            f"  {kind:<9} inference {infer / 2**20:8.2f} MiB  training {train / 2**20:8.2f} MiB  "
            f"(output {out / 2**20:.2f}, projection {proj / 2**20:.2f}, "
            f"inference beyond output+projection: {(infer - out - proj) / 2**20:.2f} MiB = "
            f"{(infer - out - proj) / state:.1f} x N*H; Wx+Wh {weights / 2**20:.2f} MiB)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = _argtypes.Parser(
        prog="rnn-xp bench",
        description="Time rnn_xp's sequence functions on NumPy, torch and JAX against the "
        "bare GEMMs, the seed notebook's loop and torch.nn (or, with --gpu, on CuPy and torch "
        "CUDA against cuDNN), interleaved, best of several rounds. See BENCHMARKS.md.",
    )
    parser.add_argument(
        "--kind",
        action="append",
        choices=list(KINDS),
        help="Time only this cell kind (repeatable). Default: all of them.",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=["float32", "float64"],
        help="Time in this dtype (repeatable). Default: float32.",
    )
    parser.add_argument(
        "--size",
        nargs=4,
        type=_argtypes.positive,
        action="append",
        metavar=("N", "T", "D", "H"),
        help="Time this size (repeatable). Default: the suite's sizes.",
    )
    parser.add_argument(
        "--sweeps", action="store_true", help="Add the T and N sweeps. Default: off."
    )
    parser.add_argument(
        "--rounds",
        type=_argtypes.positive,
        default=7,
        help="Best of this many interleaved rounds. Default: 7.",
    )
    parser.add_argument(
        "--budget",
        type=_argtypes.seconds,
        default=20.0,
        help="Seconds per table, at most. Default: 20.",
    )
    parser.add_argument(
        "--settle",
        type=_argtypes.seconds,
        default=0.0,
        metavar="S",
        help="Sleep S seconds before each contender's turn, then make one untimed call: the "
        "other libraries' worker threads stop spinning (see BENCHMARKS.md). Default: 0.",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="Add the tracemalloc peaks of NumPy forwards. Default: off.",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="Time CuPy and torch CUDA against cuDNN instead. Default: off (CPU).",
    )
    parser.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed", "16-mixed"],
        default=None,
        help="Add rows under this mixed-precision policy (rnn_xp on torch and JAX, torch.nn "
        "under autocast) to the float32 tables. Default: bf16-mixed with --gpu, none without.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="A tiny run that only checks it works. Default: off.",
    )
    args = parser.parse_args(argv)
    from rnn_xp.batch import human_bytes, physical_memory

    memory = physical_memory()
    for N, T, D, H in args.size or []:
        # Inputs, the gates of the widest kind (LSTM) with their backward cache,
        # and every contender's copies: an upper estimate in float64.
        needed = 8 * 16 * (N * T * (D + 4 * H) + 4 * H * (D + H))
        if memory is not None and needed > memory:
            parser.error(
                f"argument --size: N={N} T={T} D={D} H={H} needs about {human_bytes(needed)} "
                f"of memory, more than this machine's {human_bytes(memory)}"
            )

    kinds = args.kind or list(KINDS)
    dtypes = args.dtype or ["float32"]
    if args.precision not in (None, "32-true") and "float32" not in dtypes:
        parser.error(
            f"argument --precision: the {args.precision} rows run float32 models; add "
            "--dtype float32"
        )
    if args.smoke:
        sizes, args.rounds, args.budget = SMOKE, 1, 1.0
    elif args.size:
        sizes = [tuple(s) for s in args.size]
    else:
        sizes = (GPU_SIZES if args.gpu else SIZES) + ((T_SWEEP + N_SWEEP) if args.sweeps else [])
        sizes = list(dict.fromkeys(sizes))  # the sweeps pass through a main size

    missing: list[str] = []
    if args.gpu:  # before anything is printed: which GPU contenders can run here
        from rnn_xp._backends import BackendUnavailable, for_run

        gpu_contenders = []
        for name, device, these in [
            ("cupy", None, [rnn_xp_cupy]),
            ("torch", "cuda", [torch_nn, rnn_xp_torch]),
            ("jax", "gpu", []),  # only its mixed rows, below
        ]:
            try:
                for_run(name, device)
                gpu_contenders += these
            except BackendUnavailable as exc:
                missing.append(f"{name}: {exc}")
        if not gpu_contenders:
            parser.error(f"argument --gpu: no GPU contender can run here ({'; '.join(missing)})")

    versions = [f"numpy {np.__version__}", f"rnn_xp {rnn_xp.__version__}"]
    for name in ("torch", "jax", "cupy"):
        with contextlib.suppress(ImportError):
            versions.append(f"{name} {__import__(name).__version__}")
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        versions.append(f"torch threads {torch.get_num_threads()}")
    except ImportError:
        pass
    print(
        f"rnn_xp benchmark; {', '.join(versions)}; {os.cpu_count()} CPUs; "
        f"best of {args.rounds} interleaved rounds"
        + (f", {args.settle} s settle before each turn" if args.settle else "")
    )

    policy = args.precision or ("bf16-mixed" if args.gpu else "32-true")
    mixed: list[Callable] = []
    if args.gpu:
        contenders = gpu_contenders
        for reason in missing:
            print(f"skipped {reason}")
        extra_for = {
            torch_nn: {"device": "cuda"},
            rnn_xp_torch: {"device": "cuda"},
            rnn_xp_torch_mixed: {"device": "cuda", "policy": policy},
            torch_nn_autocast: {"device": "cuda", "policy": policy},
            rnn_xp_jax_mixed: {"policy": policy},
        }
        if policy != "32-true":
            if rnn_xp_torch in contenders:
                mixed += [rnn_xp_torch_mixed, torch_nn_autocast]
            if not any(reason.startswith("jax") for reason in missing):
                mixed.append(rnn_xp_jax_mixed)
    else:
        contenders = CPU_CONTENDERS
        extra_for = {m: {"policy": policy} for m in _MIXED}
        if policy != "32-true":
            mixed = list(_MIXED)

    for size in sizes:
        for dtype in dtypes:
            for mode, label in GPU_PRECISIONS if args.gpu and dtype == "float32" else [(None, "")]:
                these = contenders + (mixed if dtype == "float32" else [])
                for kind in kinds:
                    bound = [(lambda k, a, m=m: m(k, a, **extra_for.get(m, {}))) for m in these]
                    for m, b in zip(these, bound):
                        b.__name__ = m.__name__
                    with contextlib.nullcontext() if mode is None else float32_matmul(mode):
                        lines = table(
                            kind, size, dtype, bound, args.rounds, args.budget, label, args.settle
                        )
                    print("\n".join(lines))
    if args.memory:
        for size in sizes:
            print("\n".join(memory_lines(size, dtypes[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
