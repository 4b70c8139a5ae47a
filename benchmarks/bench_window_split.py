"""Why the CPU window kernel stays above 1.15× of its FLOPs-ideal time: the cost per (query, key) pair of every
piece an exact band decomposition can be built from, with torch's own CPU flash-attention kernel (issue 16).

    python benchmarks/bench_window_split.py [--sizes 4096 16384] [--blocks 128 256 512 768] [--threads 2]

PixArt head shapes (16 heads × 72, float32, B = 1), w = N/8 keys per side. Pieces, each over the interior query
blocks of b tokens at once (the blocks are a strided view as the batch dimension, nothing copied):
- `full`: N×N attention (the reference the ideal is measured against);
- `rect+mask`: b queries against their b + 2w band keys with the band mask (what `window_attention` runs);
- `middle`: b queries against the 2w - b keys all of them see (no mask);
- `causal`: b queries against a b×b triangle with `is_causal` (the kernel skips tiles above the diagonal);
- `flip` (q, k, v reversed, needed for the left triangle, which is anti-causal) and `merge` (three partial
  outputs combined by their log-sum-exp), in ms.
`ns/pair` is per pair of the rectangle a piece covers (a causal triangle: b × b), `ns/band pair` per pair the
band holds. The last table adds the pieces up per
decomposition into an estimate of realized/ideal (time / (band pairs × full's ns per pair)); the log-sum-exp split
(middle + two causal triangles + flip + merge) needs the LSE, which only torch's private
`_scaled_dot_product_flash_attention_for_cpu` returns. Its output is checked against `window_attention`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difa.attention import window_attention  # noqa: E402

HEADS, HEAD_DIM = 16, 72
flash_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (out, logsumexp (B, H, L)) on CPU


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def blocks(x: torch.Tensor, count: int, length: int, start: int, step: int) -> torch.Tensor:
    """(1, H, N, D) contiguous -> (count, H, length, D) view: block i holds tokens [start + i·step, + length)."""
    _, h, n, d = x.shape
    return x.as_strided((count, h, length, d), (step * d, n * d, d, 1), x.storage_offset() + start * d)


def lse_split(q, k, v, w: int, b: int):
    """Band attention of the interior query blocks (b tokens, starting at w) as middle + right triangle + left
    triangle merged by log-sum-exp. Returns (count, H, b, D) and count."""
    n = q.shape[2]
    count = (n - 2 * w) // b
    qb = blocks(q, count, b, w, b)  # (count, H, b, D): queries [s, s+b), s = w + i·b
    o1, l1 = flash_lse(qb, blocks(k, count, 2 * w - b, b, b), blocks(v, count, 2 * w - b, b, b))[:2]  # [s-w+b, s+w)
    o2, l2 = flash_lse(qb, blocks(k, count, b, 2 * w, b), blocks(v, count, b, 2 * w, b), is_causal=True)[:2]
    # left triangle [s-w, s-w+b): key j visible iff j >= i - w, causal once both orders are reversed
    qf, kf, vf = q.flip(2), k.flip(2), v.flip(2)
    rs = n - (w + (count - 1) * b) - b  # reversed start of the last interior block
    o3, l3 = flash_lse(blocks(qf, count, b, rs, b), blocks(kf, count, b, rs + w, b), blocks(vf, count, b, rs + w, b),
                       is_causal=True)[:2]
    o3, l3 = o3.flip(0).flip(2), l3.flip(0).flip(2)
    top = torch.maximum(torch.maximum(l1, l2), l3)  # (count, H, b)
    e1, e2, e3 = (l1 - top).exp(), (l2 - top).exp(), (l3 - top).exp()
    total = e1 + e2 + e3
    out = o1 * (e1 / total)[..., None] + o2 * (e2 / total)[..., None] + o3 * (e3 / total)[..., None]
    return out, count


def band_mask(b: int, w: int) -> torch.Tensor:
    rows, cols = torch.arange(b)[:, None], torch.arange(b + 2 * w)[None]
    return (cols >= rows) & (cols <= rows + 2 * w)  # (b, b+2w)


def bench(n: int, sizes: list[int], reps: int) -> None:
    w = n // 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))  # (B, H, N, D)
    full = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    full_ns = full / (HEADS * n * n) * 1e9
    print(f"\nN={n} w={w}: full {full * 1e3:.1f} ms, {full_ns:.3f} ns/pair")
    print("| piece | b | ms | ns/pair | ns/band pair |")
    print("|---|---:|---:|---:|---:|")
    print(f"| full | {n} | {full * 1e3:.1f} | {full_ns:.3f} | {full_ns:.3f} |")
    pieces = {}
    for b in sizes:
        if b >= 2 * w:
            continue
        count = (n - 2 * w) // b
        qb = blocks(q, count, b, w, b)
        rect_k, rect_v = blocks(k, count, b + 2 * w, 0, b), blocks(v, count, b + 2 * w, 0, b)
        mask = band_mask(b, w)
        rect = timed(lambda: F.scaled_dot_product_attention(qb, rect_k, rect_v, attn_mask=mask), reps)
        mid_k, mid_v = blocks(k, count, 2 * w - b, b, b), blocks(v, count, 2 * w - b, b, b)
        mid = timed(lambda: flash_lse(qb, mid_k, mid_v), reps)
        tri_k, tri_v = blocks(k, count, b, 2 * w, b), blocks(v, count, b, 2 * w, b)
        tri = timed(lambda: flash_lse(qb, tri_k, tri_v, is_causal=True), reps)
        rows = HEADS * count * b
        for name, t, computed, band in (("rect+mask", rect, b + 2 * w, 2 * w + 1), ("middle", mid, 2 * w - b, 2 * w - b),
                                        ("causal", tri, b, (b + 1) / 2)):
            print(f"| {name} | {b} | {t * 1e3:.1f} | {t / (rows * computed) * 1e9:.3f} | "
                  f"{t / (rows * band) * 1e9:.3f} |")
        pieces[b] = (count, rect, mid, tri)
    flip = timed(lambda: (q.flip(2), k.flip(2), v.flip(2)), reps)
    lse = torch.randn(HEADS, n)
    out = torch.randn(HEADS, n, HEAD_DIM)
    merge = timed(lambda: out * (lse - lse).exp()[..., None] + out * lse.exp()[..., None] + out * lse[..., None], reps)
    print(f"| flip q, k, v | - | {flip * 1e3:.1f} | - | - |\n| merge | - | {merge * 1e3:.1f} | - | - |")

    print(f"\nN={n}: estimated realized/ideal over the interior rows, from the pieces above")
    print("| b | rect+mask | LSE split (middle + 2 causal + flip + merge) | LSE split max error |")
    print("|---:|---:|---:|---:|")
    for b, (count, rect, mid, tri) in pieces.items():
        share = count * b / n  # interior rows / all rows: flip and merge are charged in that share
        ideal = HEADS * count * b * (2 * w + 1) * full_ns * 1e-9
        split = 2 * tri + mid + share * (flip + merge)
        got, count = lse_split(q, k, v, w, b)
        ref = window_attention(q, k, v, w)[0, :, w: w + count * b]  # (H, count·b, D)
        err = (got.permute(1, 0, 2, 3).reshape(HEADS, count * b, HEAD_DIM) - ref).abs().max().item()
        print(f"| {b} | {rect / ideal:.2f} | {split / ideal:.2f} | {err:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[4096, 16384])
    ap.add_argument("--blocks", nargs="+", type=int, default=[128, 256, 512, 768])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, float32, 16 heads × 72, B = 1, w = N/8, "
          f"median of {args.reps}")
    for n in args.sizes:
        bench(n, args.blocks, args.reps)


if __name__ == "__main__":
    main()
