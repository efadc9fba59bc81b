"""A real training run: a character-level LSTM language model on a bundled text.

The text is the Declaration of Independence (1776, public domain),
``rnn_xp/data/declaration.txt``. The model reads one-hot characters and
predicts the next one, trained with truncated BPTT: ``batch`` parallel streams
of the text, ``seq_len`` characters a step, the final states of one step passed
as the initial states of the next. Only rnn_xp's analytic backward and
`rnn_xp.optim.Adam` are used, so it runs on NumPy, CuPy, torch and JAX arrays.

The result is the held-out cross-entropy (last 10 % of the text) in nats per
character and its perplexity, next to the unigram baseline: the cross-entropy
of the training text's character frequencies (add-one smoothed) on the same
held-out text.

Under a precision policy (``precision="bf16-mixed"`` or ``"16-mixed"``, see
`rnn_xp.precision`) the LSTM's products read half-precision operands, its
state and the parameters stay float32, and the readout is float32. Under
``"16-mixed"`` the gradient is loss-scaled (`rnn_xp.optim.LossScaler`).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from ._backends import Loaded, arange, asarray
from .model import Recurrent
from .optim import Adam, LossScaler
from .precision import Policy, policy

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "TrainResult",
    "load_text",
    "read_checkpoint",
    "settings_of",
    "train_char_lm",
]


def load_text() -> str:
    return resources.files("rnn_xp").joinpath("data/declaration.txt").read_text("utf-8")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss per step, nats/char
    held_out: float = math.nan  # final held-out loss, nats/char
    unigram: float = math.nan  # the baseline's held-out loss, nats/char
    vocab: str = ""

    @property
    def perplexity(self) -> float:
        return math.exp(self.held_out)

    @property
    def unigram_perplexity(self) -> float:
        return math.exp(self.unigram)


def _one_hot(xp, ids, V: int, dtype, dev) -> Any:
    return xp.astype(xp.expand_dims(ids, axis=-1) == arange(xp, V, dev), dtype)


def _cross_entropy(xp, logits, targets_1h):
    """Mean cross-entropy and its gradient with respect to ``logits``, (N, T, V)."""
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    total = xp.sum(e, axis=-1, keepdims=True)
    log_p = shifted - xp.log(total)
    count = targets_1h.shape[0] * targets_1h.shape[1]
    loss = -xp.sum(log_p * targets_1h) / count
    return loss, (e / total - targets_1h) / count


KIND = "rnn-xp train checkpoint"
VERSION = 1
SETTINGS = (
    "hidden_size",
    "dtype",
    "seed",
    "lr",
    "seq_len",
    "batch",
    "betas",
    "eps",
    "max_norm",
    "precision",
)
"""What a resumed run must share with the run that wrote its checkpoint."""
BETAS, EPS, MAX_NORM = (0.9, 0.999), 1e-8, 5.0  # Adam's settings in this training run


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; ``detail`` says why, in one line."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"checkpoint: {detail}")
        self.detail = detail


@dataclass
class Checkpoint:
    """The state of a training run after ``step`` steps, as `train_char_lm` writes it.

    The file is a model file (`rnn_xp.load` reads the LSTM) whose extra arrays
    hold the readout (``readout.W``, ``readout.b``), the vocabulary
    (``vocab``, code points) and, under ``train.``: the settings
    (``train.settings``, JSON as uint8), ``train.counters`` (step, stream
    offset, Adam's t), ``train.losses`` (every step's loss so far), the LSTM
    states carried into the next step (``train.state.h``, ``train.state.c``)
    and Adam's moments (``train.adam.m.NAME``, ``train.adam.v.NAME`` for every
    parameter NAME, the readout's included). Under ``16-mixed``,
    ``train.scaler`` holds the loss scaler's scale, its count of finite steps
    in a row and of skipped steps.
    """

    settings: dict[str, Any]
    step: int
    offset: int
    adam_t: int
    params: dict[str, np.ndarray]  # the model's state_dict, then readout.W and readout.b
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    state: tuple[np.ndarray, np.ndarray]
    losses: list[float]
    scaler: tuple[float, int, int] | None = None  # (scale, finite in a row, skipped)

    def mismatches(self, settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{name: (in the checkpoint, asked for now)}`` for every setting that differs."""
        return {
            k: (self.settings.get(k), v)
            for k, v in settings.items()
            if _jsonable(self.settings.get(k)) != _jsonable(v)
        }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def settings_of(
    hidden_size: int = 64,
    seq_len: int = 32,
    batch: int = 16,
    lr: float = 0.01,
    dtype: str = "float32",
    seed: int = 0,
    precision: str | None = None,
) -> dict[str, Any]:
    """The settings a checkpoint records (with the optimizer's fixed ones)."""
    named = policy(precision)
    return {
        "hidden_size": int(hidden_size),
        "dtype": str(dtype),
        "seed": int(seed),
        "lr": float(lr),
        "seq_len": int(seq_len),
        "batch": int(batch),
        "betas": list(BETAS),
        "eps": EPS,
        "max_norm": MAX_NORM,
        "precision": None if named is None else named.name,
    }


def read_checkpoint(path: Any) -> Checkpoint:
    """The training state in ``path``; `CheckpointError` if it holds none (or is unreadable)."""
    from .io import load, load_extra

    try:
        model = load(path)
        extra = load_extra(path)
    except Exception as exc:  # any failure to read it: it is not a checkpoint to resume
        detail = getattr(exc, "detail", None) or " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"cannot be read as an rnn-xp model ({detail})") from None
    if "train.settings" not in extra:
        raise CheckpointError("holds a model but no training state")
    try:
        settings = json.loads(bytes(np.asarray(extra["train.settings"], np.uint8)).decode())
        if not isinstance(settings, dict) or settings.get("kind") != KIND:
            raise ValueError("not a training checkpoint")
        if settings.get("version") != VERSION:
            raise ValueError(f"checkpoint version {settings.get('version')}, expected {VERSION}")
        step, offset, adam_t = (int(c) for c in extra["train.counters"])
        params = model.state_dict() | {
            "readout.W": extra["readout.W"],
            "readout.b": extra["readout.b"],
        }
        m = {k: extra[f"train.adam.m.{k}"] for k in params}
        v = {k: extra[f"train.adam.v.{k}"] for k in params}
        state = (extra["train.state.h"], extra["train.state.c"])
        losses = [float(x) for x in extra["train.losses"]]
        scaler = None
        if "train.scaler" in extra:
            scale, good, skipped = (float(v) for v in extra["train.scaler"])
            scaler = (scale, int(good), int(skipped))
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"has an incomplete training state ({exc})") from None
    if len(losses) != step or step < 1 or offset < 0 or adam_t < 1:
        raise CheckpointError(
            f"has an inconsistent training state ({len(losses)} losses, step {step}, "
            f"offset {offset}, Adam step {adam_t})"
        )
    H, batch = settings.get("hidden_size"), settings.get("batch")
    if (model.mode, model.num_layers, model.bidirectional, model.hidden_size) != (
        "lstm",
        1,
        False,
        H,
    ):
        raise CheckpointError("holds a model that is not this training run's LSTM")
    wrong = [k for k in params if not (m[k].shape == v[k].shape == tuple(params[k].shape))]
    wrong += [name for name, a in zip("hc", state) if a.shape != (1, batch, H)]
    if wrong:
        raise CheckpointError(f"has a training state of the wrong shape ({', '.join(wrong)})")
    return Checkpoint(
        {k: settings.get(k) for k in SETTINGS},
        step,
        offset,
        adam_t,
        params,
        m,
        v,
        state,
        losses,
        scaler,
    )


def train_char_lm(
    backend: Loaded,
    steps: int = 300,
    hidden_size: int = 64,
    seq_len: int = 32,
    batch: int = 16,
    lr: float = 0.01,
    dtype: str = "float32",
    seed: int = 0,
    progress: Any = None,
    checkpoint: Any = None,
    checkpoint_every: int = 100,
    resume: Checkpoint | None = None,
    log_every: int = 10,
    precision: str | None = None,
) -> tuple[TrainResult, Recurrent, dict]:
    """Train; return the result, the model and the readout ``{"W", "b"}``.

    The step losses stay on the device and are read to the host together,
    once every ``log_every`` steps, before each checkpoint and after the last
    step: on a GPU each read waits for the device, so a read per step would
    stall the loop every step. ``progress``, if given, is called as
    ``progress(step, loss)`` after each read, with the loss of that step;
    ``log_every=1`` reads, and reports, every step.
    ``checkpoint``, a .npz or .safetensors path, is written every
    ``checkpoint_every`` steps and at the end: the model, the readout and the
    vocabulary, and everything needed to resume (see `Checkpoint`).
    ``resume``, a `Checkpoint` (from `read_checkpoint`) made with the same
    settings, continues that run up to ``steps`` in total, bit for bit as if it
    had not stopped; if it is already at ``steps`` or beyond, nothing is
    trained and the result reports the checkpoint's model.
    ``precision``, a policy name (`rnn_xp.precision`), runs the LSTM under it:
    ``dtype`` must then be float32, the parameters' dtype.
    """
    if isinstance(log_every, bool) or not isinstance(log_every, numbers.Integral) or log_every < 1:
        raise ValueError(f"log_every: expected a positive integer, got {log_every!r}")
    settings = settings_of(hidden_size, seq_len, batch, lr, dtype, seed, precision)
    named = policy(precision)
    if named is not None and str(dtype) != "float32":
        raise ValueError(
            f"precision: the policy {named.name!r} keeps the parameters in float32; "
            f"expected dtype 'float32', got {dtype!r}"
        )
    if resume is not None and resume.mismatches(settings):
        diff = ", ".join(
            f"{k} {a!r} (now {b!r})" for k, (a, b) in resume.mismatches(settings).items()
        )
        raise CheckpointError(f"was made with other settings: {diff}")
    text = load_text()
    vocab = sorted(set(text))
    V = len(vocab)
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(ids))
    train_ids, test_ids = ids[:split], ids[split:]

    counts = np.bincount(train_ids, minlength=V) + 1.0
    unigram = float(-np.mean(np.log(counts / counts.sum())[test_ids[1:]]))

    xp, dev = backend.xp, backend.device
    like = backend.asarray(np.zeros(1, dtype=dtype))
    # The readout is float32: the LSTM's outputs come back float32 under a policy.
    mixed = None if named is None else Policy(named.name, output="float32")
    model = Recurrent(
        "lstm",
        V,
        hidden_size,
        batch_first=True,
        seed=seed,
        like=like,
        dtype=dtype,
        precision=mixed,
    )
    scaler = LossScaler() if named is not None and named.name == "16-mixed" else None
    rng = np.random.default_rng(seed + 1)
    k = 1 / math.sqrt(hidden_size)
    dt = model._dtype
    readout = {
        "W": asarray(xp, rng.uniform(-k, k, (hidden_size, V)), dt, dev),
        "b": asarray(xp, np.zeros(V), dt, dev),
    }
    params = model.state_dict() | {"readout." + n: a for n, a in readout.items()}
    optimizer = Adam(lr=lr, betas=BETAS, eps=EPS, max_norm=MAX_NORM)

    stream_len = (len(train_ids) - 1) // batch
    starts = np.arange(batch) * stream_len
    # The training text goes to the device once, one-hot (a few MB), and each
    # step takes its batch from it there: an upload per step would wait for the
    # device too (torch copies from pageable host memory synchronously).
    text_1h = _one_hot(xp, asarray(xp, train_ids, None, dev), V, dt, dev)  # (len, V)
    window = asarray(xp, starts[:, None] + np.arange(seq_len), None, dev)  # (batch, seq_len)
    result = TrainResult(vocab="".join(vocab))
    state, offset, first = None, 0, 1
    pending: list = []  # this run's losses not yet read: 0-d arrays on the device
    if resume is not None:
        if {k: a.shape for k, a in resume.params.items()} != {
            k: tuple(a.shape) for k, a in params.items()
        }:
            raise CheckpointError("has parameters of other shapes than this run's model")
        params = {k: asarray(xp, resume.params[k], dt, dev) for k in params}
        optimizer.t = resume.adam_t
        optimizer.m = {k: asarray(xp, a, dt, dev) for k, a in resume.m.items()}
        optimizer.v = {k: asarray(xp, a, dt, dev) for k, a in resume.v.items()}
        state = tuple(asarray(xp, a, dt, dev) for a in resume.state)
        offset, first = resume.offset, resume.step + 1
        if scaler is not None and resume.scaler is not None:
            scaler.scale, scaler._good, scaler.skipped = resume.scaler
        result.losses = list(resume.losses)
    for step in range(first, steps + 1):
        if offset + seq_len > stream_len:  # a pass over the text is done: start again
            state, offset = None, 0
        pos = xp.reshape(window + offset, (-1,))
        x = xp.reshape(xp.take(text_1h, pos, axis=0), (batch, seq_len, V))
        y = xp.reshape(xp.take(text_1h, pos + 1, axis=0), (batch, seq_len, V))
        offset += seq_len

        model.load_state_dict({k: v for k, v in params.items() if not k.startswith("readout.")})
        out, state = model.forward(x, state)
        logits = out @ params["readout.W"] + params["readout.b"]
        loss, dlogits = _cross_entropy(xp, logits, y)
        N, T, H = out.shape
        out2, d2 = xp.reshape(out, (N * T, H)), xp.reshape(dlogits, (N * T, V))
        if scaler is not None:  # every gradient scaled, the readout's too
            dlogits = scaler.scale_gradient(dlogits)
            d2 = xp.reshape(dlogits, (N * T, V))
        model.backward(dlogits @ params["readout.W"].T)
        grads = model.grads | {"readout.W": out2.T @ d2, "readout.b": xp.sum(d2, axis=0)}
        if scaler is None:
            params = optimizer.step(params, grads)
        else:
            params = scaler.step(optimizer, params, grads)
        pending.append(loss)
        save = checkpoint is not None and (step % checkpoint_every == 0 or step == steps)
        if step % log_every == 0 or step == steps or save:
            # One transfer (one wait for the device) for all the losses since the last.
            result.losses += backend.to_numpy(xp.stack(pending)).tolist()
            pending.clear()
            if progress is not None:
                progress(step, result.losses[-1])
        if save:
            train_state = {
                "train.settings": np.frombuffer(
                    json.dumps({"kind": KIND, "version": VERSION, **settings}).encode(),
                    dtype=np.uint8,
                ),
                "train.counters": np.array([step, offset, optimizer.t], dtype=np.int64),
                "train.losses": np.array(result.losses, dtype=np.float64),
                "train.state.h": state[0],
                "train.state.c": state[1],
            }
            for name in params:
                train_state[f"train.adam.m.{name}"] = optimizer.m[name]
                train_state[f"train.adam.v.{name}"] = optimizer.v[name]
            if scaler is not None:
                train_state["train.scaler"] = np.array(
                    [scaler.scale, scaler._good, scaler.skipped], dtype=np.float64
                )
            _save(model, params, vocab, checkpoint, train_state)

    model.load_state_dict({k: v for k, v in params.items() if not k.startswith("readout.")})
    x = _one_hot(xp, asarray(xp, test_ids[None, :-1], None, dev), V, dt, dev)
    y = _one_hot(xp, asarray(xp, test_ids[None, 1:], None, dev), V, dt, dev)
    out, _ = model.forward(x, inference=True)
    held_out, _ = _cross_entropy(xp, out @ params["readout.W"] + params["readout.b"], y)
    result.held_out, result.unigram = float(held_out), unigram
    return result, model, {"W": params["readout.W"], "b": params["readout.b"]}


def _save(model: Recurrent, params: dict, vocab: list[str], path: Any, extra: dict) -> None:
    model.load_state_dict({k: v for k, v in params.items() if not k.startswith("readout.")})
    codepoints = np.array([ord(c) for c in vocab], dtype=np.int32)
    model.save(
        path,
        extra={
            "readout.W": params["readout.W"],
            "readout.b": params["readout.b"],
            "vocab": codepoints,
            **extra,
        },
    )
