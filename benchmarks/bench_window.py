"""Full vs window (band) attention on CPU at PixArt head shapes, w = N/8 per side (DiTFastAttn default).

Full and window runs are interleaved within every repeat so machine noise hits both alike; times are medians.
"realized" is window/full time, "ideal" the FLOPs ratio band_pairs(N, w)/N².

    python benchmarks/bench_window.py [--sizes 1024 4096 16384] [--repeats 7] [--threads 2] [--blocks 128 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from difa.attention import band_pairs, full_attention, window_attention, window_tokens
from difa.attention.window import default_block

BATCH, HEADS, HEAD_DIM = 1, 16, 72  # PixArt-α/Σ self-attention: 16 heads × 72 = 1152 channels
DFA_WINDOW = 0.125  # DiTFastAttn: w = N/8 tokens per side
DEFAULT_SIZES = (1024, 4096, 16384)
DEFAULT_REPEATS = 7
MIN_REPEATS = 3
BUDGET_S = 30.0  # per size: fewer repeats (down to MIN_REPEATS) where one full+window round is slow
MS = 1e3


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(n: int, blocks: list[int | None], max_repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))  # (B, H, N, D)
    w = window_tokens(DFA_WINDOW, n)
    runs = {"full": lambda: full_attention(q, k, v)}
    for block in blocks:
        runs[block] = lambda block=block: window_attention(q, k, v, w, block=block)
    warm = sum(timed(fn) for fn in runs.values())  # warm-up round, also sizes the repeat count
    repeats = max(MIN_REPEATS, min(max_repeats, int(BUDGET_S / warm)))
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    full = statistics.median(times["full"])
    ideal = band_pairs(n, w) / n**2
    rows = []
    for block in blocks:
        window = statistics.median(times[block])
        realized = window / full
        rows.append(
            dict(
                n=n, w=w, block=block or default_block(n, w), repeats=repeats, full_ms=full * MS,
                window_ms=window * MS, realized=realized, ideal=ideal, over_ideal=realized / ideal,
            )
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| N | w | block | repeats | full (ms) | window (ms) | realized | ideal | realized/ideal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['w']} | {r['block']} | {r['repeats']} | {r['full_ms']:.1f} | {r['window_ms']:.1f} | "
            f"{r['realized']:.3f} | {r['ideal']:.3f} | {r['over_ideal']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="token counts N")
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help=f"most timed rounds per size (at least {MIN_REPEATS} run)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--blocks", type=int, nargs="+", default=[None], help="query block sizes (default: automatic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, B={BATCH} H={HEADS} D={HEAD_DIM} float32, "
        f"w = N/8 per side, 1-min load average {os.getloadavg()[0]:.2f} (other processes skew the timings)"
    )
    rows = []
    for n in args.sizes:
        for r in bench_size(n, args.blocks, args.repeats):
            print(
                f"N={r['n']:>6} w={r['w']:>5} block={r['block']:>5}  full {r['full_ms']:9.1f} ms  window "
                f"{r['window_ms']:9.1f} ms  realized {r['realized']:.3f}  ideal {r['ideal']:.3f}  "
                f"realized/ideal {r['over_ideal']:.2f}",
                flush=True,
            )
            rows.append(r)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
