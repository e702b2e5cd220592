"""Benchmark the codebook stage's feature collection (quest.vectors.VectorSample) at N and 4N vectors.

    python tools/bench_codebook.py [--n 500000] [--dim 128] [--batch 64] [--hw 8] [--capacity 0]

Feeds a VectorSample batches shaped as a teacher gives them (B×C×H×W maps flattened with
quest.losses.flatten_locations, as the codebook stage does) until N vectors were seen, then reads the
kept rows; the same for 4N. Each size runs in a fresh subprocess: its peak resident memory
(VmHWM, reset before collecting) minus the memory resident then is what the collection took, compared
with the bytes of the kept rows (`peak/kept`, the larger of the two sizes; target ≤ 1.3). torch's CPU tensors
are invisible to tracemalloc, so resident memory it is. --capacity C keeps a uniform sample of at
most C vectors (the codebook.max_vectors path) instead of every vector.
The last line is `collect_scaling = X`: seconds at 4N / seconds at N (linear = 4.0; target ≤ 4.6).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quest.losses import flatten_locations
from quest.vectors import VectorSample


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM; ru_maxrss where there is no /proc)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def reset_peak() -> int:
    """Start measuring here: Linux resets the peak to the current resident memory when 5 is written
    to clear_refs (imports peak above what stays resident). Returns the baseline in bytes."""
    # Where that is not allowed the baseline is the peak so far, which can only understate the rest.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return peak_rss()


def feed(n: int, maps: list[torch.Tensor], capacity: int) -> tuple[float, int]:
    """Feed n vectors to a VectorSample and read its rows: (seconds, bytes of the kept rows)."""
    sample = VectorSample(capacity, torch.Generator().manual_seed(0))
    start, left, i = time.perf_counter(), n, 0
    while left > 0:
        rows = flatten_locations(maps[i % len(maps)])[:left]
        sample.add(rows)
        left, i = left - rows.shape[0], i + 1
    kept = sample.rows
    return time.perf_counter() - start, kept.numel() * kept.element_size()


def collect(n: int, args) -> dict:
    """Best time of the repeats at n vectors, and the peak memory they took."""
    torch.manual_seed(0)
    maps = [torch.randn(args.batch, args.dim, args.hw, args.hw) for _ in range(4)]  # cycled
    feed(2 * args.batch * args.hw * args.hw, maps, args.capacity)  # one-time library set-up
    base = reset_peak()
    runs = [feed(n, maps, args.capacity) for _ in range(args.repeats)]
    return {"seconds": min(t for t, _ in runs), "kept": runs[0][1], "peak": peak_rss() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500_000, help="vectors of the smaller run")
    parser.add_argument("--dim", type=int, default=128, help="channels of the teacher map")
    parser.add_argument("--batch", type=int, default=64, help="images a batch")
    parser.add_argument("--hw", type=int, default=8, help="height = width of the teacher map")
    parser.add_argument(
        "--capacity", type=int, default=0, help="sample size; 0 = keep every vector"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (copies are memory-bound)"
    )
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(collect(args.child, args)))
        return
    if (
        min(args.n, args.dim, args.batch, args.hw, args.repeats, args.threads) < 1
        or args.capacity < 0
    ):
        parser.error("sizes, --repeats and --threads must be at least 1, --capacity at least 0")

    def measure(n: int) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    kept = f"a sample of {args.capacity:,}" if args.capacity else "every vector"
    print(
        f"VectorSample: {args.dim}-dim vectors from {args.batch}×{args.dim}×{args.hw}×{args.hw} "
        f"teacher maps ({args.batch * args.hw * args.hw:,} a batch), keeping {kept}; best of "
        f"{args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'':3}{'vectors':>11}{'seconds':>10}{'Mvec/s':>9}{'kept MiB':>10}{'peak MiB':>10}")
    results = {}
    for label, n in (("N", args.n), ("4N", 4 * args.n)):
        r = results[label] = measure(n)
        print(
            f"{label:<3}{n:>11,}{r['seconds']:>10.3f}{n / r['seconds'] / 1e6:>9.2f}"
            f"{r['kept'] / 2**20:>10.1f}{r['peak'] / 2**20:>10.1f}"
        )
    print(f"peak/kept = {max(r['peak'] / r['kept'] for r in results.values()):.2f}")
    print(f"collect_scaling = {results['4N']['seconds'] / results['N']['seconds']:.2f}")


if __name__ == "__main__":
    main()
