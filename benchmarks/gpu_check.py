"""The GPU checks of issue 16, one summary line each, for a machine with CUDA (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py            # on CUDA: fp16 / bf16 window attention (flash-attn where installed,
                                              # else difa's blocked SDPA path) against a dense float64 reference,
                                              # then the window-vs-full timing of bench_window.py on the GPU
    python benchmarks/gpu_check.py --dry-run  # anywhere: the same checks on CPU in float32 at small sizes, so the
                                              # script itself is tested without a GPU (tests/test_gpu_check.py)

Tolerances (max |window - reference| over the output, reference in float64): float32 1e-5, bfloat16 2e-2,
float16 2e-3 (attention outputs are averages of values in [-4, 4]; these are the dtypes' rounding at that range).
Exit status 0 when every check passes, 1 otherwise. Budget: under 8 minutes on one GPU (the sizes below).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from difa.attention import band_pairs, full_attention, window_attention, window_tokens

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
HEADS, HEAD_DIM = 16, 72  # PixArt-α/Σ
GPU_SIZES = (1024, 4096, 16384)
DRY_SIZES = (64, 256)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
    """Band attention |i - j| <= w written densely in float64: the N x N scores with everything outside the band
    at -inf (fine at these sizes; the kernel under test never builds it)."""
    q, k, v = (x.double() for x in (q, k, v))
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    band = (i[:, None] - i[None, :]).abs() <= w  # (N, N)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, N, N)
    return torch.softmax(scores.masked_fill(~band, float("-inf")), dim=-1) @ v


def check_window(device: str, dtype: torch.dtype, n: int) -> tuple[bool, str]:
    g = torch.Generator(device="cpu").manual_seed(n)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3))
    w = window_tokens(0.125, n)
    got = window_attention(q, k, v, w)
    err = float((got.double() - reference(q, k, v, w)).abs().max())
    path = "flash-attn" if device == "cuda" and dtype != torch.float32 and _has_flash() else "blocked SDPA"
    ok = err <= TOLERANCE[dtype]
    return ok, f"window {str(dtype).split('.')[-1]:8s} N={n:<6d} {path:12s} max err {err:.2e} (tol {TOLERANCE[dtype]:.0e})"


def time_window(device: str, dtype: torch.dtype, n: int, repeats: int = 5) -> str:
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    w = window_tokens(0.125, n)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(lambda: full_attention(q, k, v))
    timed(lambda: window_attention(q, k, v, w))  # warm-up
    full, win = [], []
    for _ in range(repeats):  # interleaved
        full.append(timed(lambda: full_attention(q, k, v)))
        win.append(timed(lambda: window_attention(q, k, v, w)))
    full.sort(), win.sort()
    ideal = band_pairs(n, w) / n**2
    ratio = win[len(win) // 2] / full[len(full) // 2]
    return (f"timing  {str(dtype).split('.')[-1]:8s} N={n:<6d} window/full {ratio:.3f} (FLOPs ideal {ideal:.3f}, "
            f"measured/ideal {ratio / ideal:.2f}); full {1e3 * full[len(full) // 2]:.2f} ms median of {repeats}")


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, float32, small sizes: test the script itself")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or pass --dry-run to test the script on CPU")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    dtypes = (torch.float32,) if args.dry_run else (torch.float16, torch.bfloat16)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    t0 = time.perf_counter()
    print(f"gpu_check on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else " (dry run)")
          + f", flash-attn {'installed' if _has_flash() else 'not installed: the blocked SDPA path is checked'}")
    failed = 0
    for dtype in dtypes:
        for n in sizes:
            ok, line = check_window(device, dtype, n)
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {line}")
    for n in sizes:
        print(f"INFO  {time_window(device, dtypes[0], n, repeats=3 if args.dry_run else 7)}")
    print(f"gpu_check: {'all checks passed' if not failed else f'{failed} check(s) failed'} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
