"""`rnn-xp run` on NumPy against a plain torch.nn loop over the same file, as whole processes.

    python benchmarks/batch_cores.py [--rounds R] [--vs torch|jobs1] [--mode M]
        [--size N T D H] [--layers L] [--unidirectional] [--batch-size B] [--backend NAME]
        [--dir DIR]

Writes the weights (``rnn-xp init``, seed 0) and the input (``x.npy``, (N, T, D) standard
normal float32, seed 0) into DIR (default: a new temporary folder), then times each command
as a whole process, start-up included, in ABBA order (A B, then B A, and so on, one warm-up
run of each first), and prints each one's wall, CPU (user + system) seconds and peak memory
as min / median / max, the ratio of the medians A / B and each pair's ratio.

A is ``rnn-xp run --weights w.npz --input x.npy --out y.npy --batch-size B --no-progress
--backend numpy`` (or the ``--backend`` given), with its default ``--jobs``: every core. B is,
with ``--vs torch`` (the default), this file's ``torch-loop`` command: ``torch.nn.LSTM`` (or
GRU, RNN) holding the same weights, under ``torch.inference_mode``, reading the .npy in
batches of B and writing the outputs into a .npy; with ``--vs jobs1``, the same
``rnn-xp run ... --jobs 1``: one chunk at a time, as before ``--jobs`` existed. The default
size is the issue's: 20000 sequences of T=50, D=8, a 2-layer bidirectional LSTM with H=64,
batches of 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def torch_loop(weights: str, x: str, y: str, batch_size: int) -> None:
    """The yardstick: what a torch user writes to run a saved model over a .npy."""
    import torch

    saved = np.load(weights)
    config = json.loads(str(saved["__config__"]))
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(config["mode"])
    kwargs = {}
    if module is None:
        module, kwargs = torch.nn.RNN, {"nonlinearity": config["mode"].removeprefix("rnn_")}
    model = module(
        config["input_size"],
        config["hidden_size"],
        config["num_layers"],
        bias=config["bias"],
        batch_first=True,
        bidirectional=config["bidirectional"],
        **kwargs,
    )
    model.load_state_dict(
        {k: torch.from_numpy(saved[k]) for k in saved.files if k != "__config__"}
    )
    model.eval()
    xs = np.load(x, mmap_mode="r")
    N, T, _ = xs.shape
    F = config["hidden_size"] * (2 if config["bidirectional"] else 1)
    ys = np.lib.format.open_memmap(y, "w+", np.float32, (N, T, F))
    with torch.inference_mode():
        for start in range(0, N, batch_size):
            out, _ = model(torch.from_numpy(np.array(xs[start : start + batch_size])))
            ys[start : start + batch_size] = out.numpy()
    ys.flush()


def make_input(path: str, N: int, T: int, D: int) -> None:
    np.save(path, np.random.default_rng(0).standard_normal((N, T, D)).astype(np.float32))


def compare(a: str, b: str) -> None:
    """The largest difference between two outputs, read a block of rows at a time."""
    ya, yb = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    worst = 0.0
    for start in range(0, len(ya), 1024):
        rows = slice(start, start + 1024)
        worst = max(worst, float(np.max(np.abs(ya[rows] - yb[rows]), initial=0.0)))
    print(f"max |A - B| of the outputs: {worst:.3g}")


def timed(argv: list[str], cwd: Path) -> dict[str, float]:
    """One whole-process run: wall seconds, and the child's own CPU seconds and peak memory."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.read().decode()}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_mib": usage.ru_maxrss / 1024,  # KiB on Linux
    }


def summary(values: list[float]) -> str:
    return (
        f"{min(values):7.2f} {statistics.median(values):7.2f} {max(values):7.2f}"
        f"  (n={len(values)})"
    )


def versions() -> str:
    import numpy
    from threadpoolctl import threadpool_info

    import rnn_xp
    from rnn_xp.batch import available_cores

    parts = [f"Python {platform.python_version()}", f"numpy {numpy.__version__}"]
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    parts += [f"{i['internal_api']} {i['version']} ({i['num_threads']} threads)" for i in blas]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    parts.append(f"rnn_xp {rnn_xp.__version__}")
    return f"{', '.join(parts)}; {available_cores()} cores ({cpu_model()})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # Run in processes of their own, so that this one stays small: a child's peak memory
    # (getrusage's ru_maxrss) starts from the peak of the process that started it.
    if args[:1] == ["torch-loop"]:
        torch_loop(args[1], args[2], args[3], int(args[4]))
        return
    if args[:1] == ["make-input"]:
        make_input(args[1], *map(int, args[2:5]))
        return
    if args[:1] == ["compare"]:
        compare(args[1], args[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="ABBA pairs of runs. Default: 5.")
    p.add_argument("--vs", choices=["torch", "jobs1"], default="torch")
    p.add_argument("--mode", default="lstm")
    p.add_argument("--size", type=int, nargs=4, default=[20000, 50, 8, 64], metavar="N T D H")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--unidirectional", action="store_true")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--backend", default="numpy", help="rnn-xp's --backend. Default: numpy.")
    p.add_argument("--dir", type=Path, default=None, help="Default: a new temporary folder.")
    opts = p.parse_args(args)
    N, T, D, H = opts.size
    work = opts.dir or Path(tempfile.mkdtemp(prefix="batch-cores-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    init = [py, "-m", "rnn_xp", "init", "--mode", opts.mode, "--input-size", str(D)]
    init += ["--hidden-size", str(H), "--num-layers", str(opts.layers), "--seed", "0"]
    init += [] if opts.unidirectional else ["--bidirectional"]
    subprocess.run([*init, "--out", "w.npz"], cwd=work, check=True, stdout=subprocess.DEVNULL)
    here = str(Path(__file__).resolve())
    if not (work / "x.npy").exists() or np.load(work / "x.npy", mmap_mode="r").shape != (N, T, D):
        subprocess.run(
            [py, here, "make-input", "x.npy", str(N), str(T), str(D)], cwd=work, check=True
        )
    bs = str(opts.batch_size)
    a = [py, "-m", "rnn_xp", "run", "--weights", "w.npz", "--input", "x.npy"]
    a += ["--out", "ya.npy", "--batch-size", bs, "--no-progress", "--backend", opts.backend]
    if opts.vs == "torch":
        b = [py, here, "torch-loop", "w.npz", "x.npy", "yb.npy", bs]
        names = ("rnn-xp run", "torch.nn loop")
    else:
        b = [*a[: a.index("ya.npy")], "yb.npy", *a[a.index("ya.npy") + 1 :], "--jobs", "1"]
        names = ("rnn-xp run", "rnn-xp run --jobs 1")
    layout = f"{opts.layers} layer(s), {'uni' if opts.unidirectional else 'bi'}directional"
    print(f"{opts.mode}, {layout}, N={N} T={T} D={D} H={H}, float32, batches of {bs}")
    print(versions())
    print(f"A: {' '.join(a[1:])}\nB: {' '.join(b[1:])}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    timed(a, work), timed(b, work)  # warm-up: the page cache, Python's bytecode cache
    sys.stdout.flush()
    subprocess.run([py, here, "compare", "ya.npy", "yb.npy"], cwd=work, check=True)
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for r in range(opts.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for which in order:
            runs[which].append(timed(a if which == "A" else b, work))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'':22} {'min':>7} {'median':>7} {'max':>7}")
    for which, name in zip("AB", names):
        for figure in ("wall", "cpu", "peak_mib"):
            label = f"{which} {figure}" + (" s" if figure != "peak_mib" else "")
            print(f"{label:22} {summary([run[figure] for run in runs[which]])}   {name}")
    pairs = [x["wall"] / y["wall"] for x, y in zip(runs["A"], runs["B"])]
    medians = statistics.median(r["wall"] for r in runs["A"]) / statistics.median(
        r["wall"] for r in runs["B"]
    )
    print(f"{'A / B wall, pairs':22} {summary(pairs)}")
    print(f"A / B wall, ratio of the medians: {medians:.3f}")


if __name__ == "__main__":
    main()
