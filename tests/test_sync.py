"""Host synchronisations: how often the optimizers and the training loop wait for the device.

On a GPU, every value read back to the host (``float(a)``, ``bool(a)``,
``a.item()``, a copy to NumPy) waits until the device has finished all the
work queued before it. Clipping used to read one float per gradient, and the
training loop the loss after every step. A `torch.overrides.TorchFunctionMode`
sees every torch function and Tensor method called, so these tests count the
reads on torch (on the CPU, and on CUDA where there is one); on CUDA, torch's
sync debug mode also turns any synchronisation in an optimizer step into an
error. On Dask the counterpart of a read is a computation of the graph.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import rnn_xp
from rnn_xp._backends import BACKENDS, BackendUnavailable, Loaded
from rnn_xp.optim import SGD, Adam, clip_by_global_norm
from rnn_xp.train import read_checkpoint, train_char_lm

# The torch calls that hand a tensor's value to the host. ``numpy()`` is not
# one: it refuses a CUDA tensor, so there it only ever follows ``cpu()``.
READS = frozenset(
    {"__array__", "__bool__", "__complex__", "__float__", "__index__", "__int__"}
    | {"cpu", "item", "tolist"}
)
# The torch calls that make a tensor from host data; from pageable host memory
# to a GPU, torch copies synchronously.
UPLOADS = frozenset({"as_tensor", "asarray", "tensor"})


def _load(name: str) -> Loaded:
    try:
        return BACKENDS[name].load()
    except BackendUnavailable as exc:
        if os.environ.get("RNN_XP_REQUIRE_CPU_BACKENDS") == "1" and not BACKENDS[name].gpu:
            pytest.fail(f"{name} is required here but cannot run: {exc}")
        pytest.skip(f"{name}: {exc}")


@pytest.fixture(params=["torch", pytest.param("torch:cuda", marks=pytest.mark.gpu)])
def torch_backend(request: pytest.FixtureRequest) -> Loaded:
    return _load(request.param)


def host_reads():
    """A torch function mode that records every read to the host and every upload."""
    import torch
    from torch.overrides import TorchFunctionMode

    def to_host(args, kwargs) -> bool:
        targets = [*args[1:], *kwargs.values()]
        return any(
            (isinstance(t, torch.device) and t.type == "cpu")
            or (isinstance(t, str) and t.startswith("cpu"))
            for t in targets
        )

    class HostReads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.reads: list[str] = []
            self.uploads = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in READS or (name == "to" and to_host(args, kwargs)):
                self.reads.append(name)
            elif name in UPLOADS and args and not isinstance(args[0], torch.Tensor):
                self.uploads += 1
            return func(*args, **kwargs)

    return HostReads()


def _lstm_grads(backend: Loaded) -> tuple[dict, dict]:
    """The parameters and gradients of a 2-layer bidirectional LSTM: 16 arrays."""
    like = backend.asarray(np.zeros(1, np.float32))
    model = rnn_xp.Recurrent(
        "lstm", 3, 4, num_layers=2, bidirectional=True, batch_first=True, seed=0, like=like
    )
    xs = backend.asarray(np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32))
    out, _ = model.forward(xs)
    model.backward(out * 0 + 1)
    assert len(model.grads) == 16
    return model.state_dict(), model.grads


STEPS = {
    "clip": lambda: lambda params, grads: clip_by_global_norm(grads, 0.01)[0],
    "sgd": lambda: SGD(lr=0.1, max_norm=0.01).step,
    "adam": lambda: Adam(lr=0.1, max_norm=0.01).step,
    "sgd-unclipped": lambda: SGD(lr=0.1, max_norm=None).step,
    "adam-unclipped": lambda: Adam(lr=0.1, max_norm=None).step,
}


@pytest.mark.parametrize("kind", list(STEPS))
def test_optimizer_steps_never_wait_for_the_device(torch_backend, kind):
    """Clipping and the steps read nothing back; before, clipping read 16 floats."""
    import torch

    params, grads = _lstm_grads(torch_backend)
    step = STEPS[kind]()
    step(params, grads)  # once outside, so Adam's second step takes its other branch
    cuda = torch_backend.device.type == "cuda"
    if cuda:  # anything that synchronises is an error
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with host_reads() as counted:
            step(params, grads)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    assert counted.reads == []
    assert counted.uploads == 0


def test_clipping_still_clips_without_reading(torch_backend):
    params, grads = _lstm_grads(torch_backend)
    with host_reads() as counted:
        new = SGD(lr=1.0, max_norm=0.01).step(params, grads)
    assert counted.reads == []
    g = {k: torch_backend.to_numpy(a).astype(np.float64) for k, a in grads.items()}
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in g.values()))
    assert norm > 0.01  # so the step did clip
    for k, p in params.items():
        want = torch_backend.to_numpy(p) - 0.01 / norm * g[k]
        np.testing.assert_allclose(torch_backend.to_numpy(new[k]), want, rtol=1e-5, atol=1e-7)


def test_clipping_keeps_dask_lazy():
    """No computation of the graph in clipping or in a step; the results stay lazy."""
    backend = _load("dask")
    from dask.callbacks import Callback

    rng = np.random.default_rng(1)
    grads_np = {k: rng.standard_normal(s) for k, s in {"a": (4, 3), "b": (6,)}.items()}
    grads = {k: backend.asarray(g) for k, g in grads_np.items()}
    params = {k: backend.asarray(np.zeros_like(g)) for k, g in grads_np.items()}
    computed = []
    with Callback(start=lambda dsk: computed.append(dsk)):
        clipped, norm = clip_by_global_norm(grads, max_norm=0.5)
        sgd = SGD(lr=1.0, max_norm=0.5).step(params, grads)
        adam = Adam(lr=1.0, max_norm=0.5).step(params, grads)
    assert computed == []
    for lazy in (*clipped.values(), norm, *sgd.values(), *adam.values()):
        assert type(lazy).__module__.startswith("dask"), type(lazy)
    want = math.sqrt(sum(float(np.sum(g * g)) for g in grads_np.values()))
    assert float(norm) == pytest.approx(want, rel=1e-14)
    scale = 0.5 / (want + 1e-12)
    np.testing.assert_allclose(np.asarray(sgd["a"]), -scale * grads_np["a"], rtol=1e-13)


@pytest.mark.parametrize("log_every", [1, 3, 10])
def test_training_reads_the_loss_once_per_log_interval(torch_backend, log_every):
    steps = 8
    reported = []
    with host_reads() as counted:
        result, _, _ = train_char_lm(
            torch_backend,
            steps=steps,
            hidden_size=8,
            progress=lambda step, loss: reported.append((step, loss)),
            log_every=log_every,
        )
    reads = math.ceil(steps / log_every)  # one copy of the losses per interval
    assert counted.reads == ["cpu"] * reads + ["__float__"]  # and the held-out loss
    logged = sorted({*range(log_every, steps + 1, log_every), steps})
    assert reported == [(step, result.losses[step - 1]) for step in logged]
    assert len(result.losses) == steps
    assert all(type(loss) is float for loss in result.losses)


def test_training_uploads_its_data_once(torch_backend):
    """The batches are taken from the text on the device, not uploaded every step."""
    uploads = []
    for steps in (2, 6):
        with host_reads() as counted:
            train_char_lm(torch_backend, steps=steps, hidden_size=8)
        uploads.append(counted.uploads)
    assert uploads[0] == uploads[1]


def test_the_log_interval_changes_no_result(tmp_path):
    """Losses, checkpoints and a resumed run do not depend on when the losses are read."""
    numpy = _load("numpy")
    runs = {}
    for log_every in (1, 3):
        path = tmp_path / f"every{log_every}.npz"
        result, _, _ = train_char_lm(
            numpy, steps=7, hidden_size=8, checkpoint=path, checkpoint_every=5, log_every=log_every
        )
        runs[log_every] = result
        assert read_checkpoint(path).losses == result.losses
    assert runs[1].losses == runs[3].losses
    assert runs[1].held_out == runs[3].held_out
    # A checkpoint at step 5, between two reads (at 3 and 6), still holds 5 losses.
    path = tmp_path / "cut.npz"
    train_char_lm(numpy, steps=5, hidden_size=8, checkpoint=path, log_every=3)
    assert read_checkpoint(path).losses == runs[1].losses[:5]
    resumed, _, _ = train_char_lm(
        numpy, steps=7, hidden_size=8, resume=read_checkpoint(path), log_every=3
    )
    assert resumed.losses == runs[1].losses


@pytest.mark.parametrize("log_every", [0, -1, 1.5, True, "10"])
def test_a_log_interval_must_be_a_positive_integer(log_every):
    with pytest.raises(ValueError, match=r"log_every: expected a positive integer"):
        train_char_lm(BACKENDS["numpy"].load(), steps=1, log_every=log_every)
