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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from ._backends import Loaded, arange, asarray
from .model import Recurrent
from .optim import Adam

__all__ = ["TrainResult", "load_text", "train_char_lm"]


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
) -> tuple[TrainResult, Recurrent, dict]:
    """Train; return the result, the model and the readout ``{"W", "b"}``.

    ``progress``, if given, is called as ``progress(step, loss)`` after each step.
    ``checkpoint``, a .npz or .safetensors path, is written every
    ``checkpoint_every`` steps and at the end (the readout and the vocabulary
    as extra arrays).
    """
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
    model = Recurrent("lstm", V, hidden_size, batch_first=True, seed=seed, like=like, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    k = 1 / math.sqrt(hidden_size)
    dt = model._dtype
    readout = {
        "W": asarray(xp, rng.uniform(-k, k, (hidden_size, V)), dt, dev),
        "b": asarray(xp, np.zeros(V), dt, dev),
    }
    params = model.state_dict() | {"readout." + n: a for n, a in readout.items()}
    optimizer = Adam(lr=lr, max_norm=5.0)

    stream_len = (len(train_ids) - 1) // batch
    starts = np.arange(batch) * stream_len
    result = TrainResult(vocab="".join(vocab))
    state, offset = None, 0
    for step in range(1, steps + 1):
        if offset + seq_len > stream_len:  # a pass over the text is done: start again
            state, offset = None, 0
        pos = starts[:, None] + offset + np.arange(seq_len)
        x = _one_hot(xp, asarray(xp, train_ids[pos], None, dev), V, dt, dev)
        y = _one_hot(xp, asarray(xp, train_ids[pos + 1], None, dev), V, dt, dev)
        offset += seq_len

        model.load_state_dict({k: v for k, v in params.items() if not k.startswith("readout.")})
        out, state = model.forward(x, state)
        logits = out @ params["readout.W"] + params["readout.b"]
        loss, dlogits = _cross_entropy(xp, logits, y)
        N, T, H = out.shape
        out2, d2 = xp.reshape(out, (N * T, H)), xp.reshape(dlogits, (N * T, V))
        model.backward(dlogits @ params["readout.W"].T)
        grads = model.grads | {"readout.W": out2.T @ d2, "readout.b": xp.sum(d2, axis=0)}
        params = optimizer.step(params, grads)
        result.losses.append(float(loss))
        if progress is not None:
            progress(step, result.losses[-1])
        if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
            _save(model, params, vocab, checkpoint)

    model.load_state_dict({k: v for k, v in params.items() if not k.startswith("readout.")})
    x = _one_hot(xp, asarray(xp, test_ids[None, :-1], None, dev), V, dt, dev)
    y = _one_hot(xp, asarray(xp, test_ids[None, 1:], None, dev), V, dt, dev)
    out, _ = model.forward(x, inference=True)
    held_out, _ = _cross_entropy(xp, out @ params["readout.W"] + params["readout.b"], y)
    result.held_out, result.unigram = float(held_out), unigram
    return result, model, {"W": params["readout.W"], "b": params["readout.b"]}


def _save(model: Recurrent, params: dict, vocab: list[str], path: Any) -> None:
    model.load_state_dict({k: v for k, v in params.items() if not k.startswith("readout.")})
    codepoints = np.array([ord(c) for c in vocab], dtype=np.int32)
    model.save(
        path,
        extra={
            "readout.W": params["readout.W"],
            "readout.b": params["readout.b"],
            "vocab": codepoints,
        },
    )
