"""Throughput of the batch job in one process and on a local Dask cluster of 1 and 2
worker processes, and the scheduler's overhead per chunk.

    python benchmarks/dask_throughput.py

Best of 3 runs each. The overhead per chunk is (time with many small chunks - time with
one chunk per worker) / (number of extra chunks), on the cluster, minus the same
difference in one process (which pays the per-call cost of rnn_xp itself).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

import rnn_xp
from rnn_xp import batch

N, T, D, H = 8192, 50, 16, 64


def best(f, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    rnn_xp.Recurrent("gru", D, H, 2, bidirectional=True, seed=0).save(tmp / "w.npz")
    np.save(tmp / "x.npy", np.random.default_rng(0).standard_normal((N, T, D)).astype("f"))

    def job(bs):
        return batch.prepare(
            str(tmp / "w.npz"), str(tmp / "x.npy"), str(tmp / "y.npy"), batch_size=bs
        )

    print(f"GRU, 2 layers, bidirectional, N={N} T={T} D={D} H={H}, float32, best of 3")
    local = {bs: best(lambda bs=bs: batch.run_file(job(bs))) for bs in (N // 2, 64)}
    print(f"  one process, chunks of {N // 2}: {N / local[N // 2]:9.0f} sequences/s")
    print(f"  one process, chunks of 64:   {N / local[64]:9.0f} sequences/s")
    for workers in (1, 2):
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            batch.run_file_distributed(job(N // workers), client)  # warm the workers
            big = best(lambda w=workers: batch.run_file_distributed(job(N // w), client))
            small = best(lambda: batch.run_file_distributed(job(64), client))
        extra = N // 64 - workers
        overhead = ((small - big) - (local[64] - local[N // 2])) / extra
        print(
            f"  {workers} worker(s), chunks of {N // workers}: {N / big:9.0f} sequences/s; "
            f"chunks of 64: {N / small:9.0f} sequences/s; "
            f"scheduler overhead {1e3 * overhead:.2f} ms per chunk"
        )


if __name__ == "__main__":
    main()
