"""Inference on an exported model: ONNX Runtime against rnn_xp's NumPy forward and torch.nn.

    python benchmarks/onnx_inference.py [--rounds R] [--kinds lstm gru ...]

For each of the benchmark suite's sizes (N, T, D, H) and cell kind, a one-layer
``Recurrent`` (float32, time-major) is exported with `Recurrent.to_onnx` and
run, interleaved in one process (`rnn_xp.bench.best_of`: round robin, every
other round reversed, best of R):

* ``onnxruntime``: the exported file in ONNX Runtime's CPU provider (its
  default threads: one per core);
* ``rnn_xp numpy``: ``model.forward(xs, inference=True)`` on NumPy;
* ``torch.nn``: the module of the same weights under ``torch.inference_mode``.

The three are checked to agree before timing. Prints best-of-R milliseconds and
each one's time over ONNX Runtime's.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

import rnn_xp
from rnn_xp import bench

SIZES = bench.SIZES


def _contenders(kind: str, N: int, T: int, D: int, H: int, folder: str) -> dict:
    import onnxruntime as ort
    import torch

    model = rnn_xp.Recurrent(kind, D, H, seed=0).eval()
    path = os.path.join(folder, f"{kind}-{N}-{T}-{D}-{H}.onnx")
    model.to_onnx(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(0).standard_normal((T, N, D)).astype(np.float32)
    cls = {"rnn_tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    module = cls(D, H)  # rnn_xp's state_dict is torch's, name for name
    module.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x = torch.from_numpy(xs)

    def ort_run():
        return session.run(["out"], {"xs": xs})[0]

    def numpy_run():
        return model.forward(xs, inference=True)[0]

    def torch_run():
        with torch.inference_mode():
            return module(x)[0]

    want = numpy_run()
    np.testing.assert_allclose(ort_run(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(torch_run().numpy(), want, rtol=1e-4, atol=1e-5)
    return {"onnxruntime": ort_run, "rnn_xp numpy": numpy_run, "torch.nn": torch_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", nargs="*", default=["rnn_tanh", "lstm", "gru"])
    parser.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds of sleep before each contender's turn (0: none)",
    )
    args = parser.parse_args()
    import onnxruntime
    import torch

    print(
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}, rnn_xp "
        f"{rnn_xp.__version__}; {os.cpu_count()} CPUs; float32, forward, best of {args.rounds}, "
        f"{args.settle} s settle"
    )
    with tempfile.TemporaryDirectory() as folder:
        for size in SIZES:
            for kind in args.kinds:
                times = bench.best_of(
                    _contenders(kind, *size, folder), args.rounds, 60.0, settle_s=args.settle
                )
                base = times["onnxruntime"]
                print(f"\n{kind}, (N, T, D, H) = {size}:")
                for label, t in times.items():
                    print(f"  {label:<14} {t * 1e3:9.3f} ms  {t / base:5.2f}x onnxruntime")


if __name__ == "__main__":
    main()
