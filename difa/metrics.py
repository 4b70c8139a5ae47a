"""Image metrics for comparing a plan with the uncompressed model: class accuracy, fidelity to a reference image
set (relative L1, PSNR, SSIM, with bootstrap intervals) and peak memory. FID and the Inception Score: difa/fid.py.

Images are float tensors (N, C, H, W) in [0, 1] (or uint8), C = 1 or 3, as the pipelines return them with
`output_type="pt"`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from difa.errors import DifaError

RSS_SAMPLE_S = 0.01
MEMORY_MEASURES = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated (tensors only)",
    "rss_peak_sampled": "process RSS peak, sampled every 10 ms (coarse: the whole process)",
}


# -- preprocessing --------------------------------------------------------------------------------------------

def unit_images(images: torch.Tensor | np.ndarray, name: str = "images") -> torch.Tensor:
    """(N, C, H, W) uint8, or float in [0, 1], C = 1 or 3 -> float32 (N, C, H, W) in [0, 1]; anything else raises."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise DifaError(f"{name} must be a non-empty (N, C, H, W) batch with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise DifaError(f"{name} must be uint8 or float in [0, 1], got dtype {x.dtype}")
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise DifaError(f"{name} must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; map [-1, 1] images with (x + 1) / 2")
    return x


def save_atomic(path: str | os.PathLike, write, follow: bool = True, what: str = "file") -> Path:
    """Call write(binary file) on a temporary file next to `path`, then rename it over `path` (difa.files;
    `follow` False: a symlink at `path` is refused)."""
    from difa.files import write_atomic

    return write_atomic(path, write, what=what, follow=follow)


# -- class accuracy -------------------------------------------------------------------------------------------

def class_accuracy(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    classifier: torch.nn.Module,
    batch_size: int = 256,
) -> float:
    """Fraction of images (N, C, H, W) in [0, 1] that `classifier` (input in [-1, 1], e.g.
    difa.zoo.FMNISTClassifier) labels as `labels` (N,)."""
    return float(class_hits(images, labels, classifier, batch_size).mean())


@torch.inference_mode()
def class_hits(images, labels, classifier: torch.nn.Module, batch_size: int = 256) -> np.ndarray:
    """(N,) float64: 1 where `classifier` labels image i as labels[i], else 0 (see class_accuracy)."""
    x = unit_images(images)
    y = torch.as_tensor(labels).long().reshape(-1)
    if len(y) != len(x):
        raise DifaError(f"class_accuracy got {len(x)} images but {len(y)} labels; pass one label per image")
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters(), torch.empty(0)).device
    try:
        hits = []
        for i in range(0, len(x), batch_size):
            logits = classifier((x[i : i + batch_size] * 2.0 - 1.0).to(device))  # (B, classes)
            hits.append(logits.argmax(dim=1).cpu() == y[i : i + batch_size])
    finally:
        classifier.train(was_training)
    return torch.cat(hits).double().numpy()


# -- fidelity to a reference set ------------------------------------------------------------------------------

def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = unit_images(a, "images"), unit_images(b, "reference images")
    if a.shape != b.shape:
        raise DifaError(f"fidelity metrics compare equal-shaped sets, got {tuple(a.shape)} vs {tuple(b.shape)}; use the same seeds and n")
    return a, b


def relative_l1(a, b) -> float:
    """sum |a - b| / sum |b| over the whole set, b the reference (0 = identical). Images in [0, 1]; unlike the
    calibration loss, the denominator is the set's total, so black backgrounds do not blow it up."""
    a, b = _pair(a, b)
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-12))


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB over the whole set (data range 1); inf for identical sets."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _pair(a, b)
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(a, b) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, data range 1) over the images; 1 for identical sets."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(a, b)
    return float(structural_similarity_index_measure(a, b, data_range=1.0))


# -- per image, and bootstrap intervals ----------------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0


def per_image_fidelity(a, b) -> dict[str, np.ndarray]:
    """Per image of a set a against its reference b, each (N,) float64: `l1_num` sum |a - b|, `l1_den` sum |b|,
    `mse` mean (a - b)^2, `ssim` mean SSIM. The set metrics are statistics of these (FIDELITY_STATS): relative_l1,
    psnr and ssim give exactly those values on the whole set."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(a, b)
    d = (a - b).flatten(1).double()  # (N, C*H*W)
    return {"l1_num": d.abs().sum(1).numpy(), "l1_den": b.flatten(1).double().abs().sum(1).numpy(),
            "mse": (d * d).mean(1).numpy(),
            "ssim": structural_similarity_index_measure(a, b, data_range=1.0, reduction="none").double().numpy()}


def _psnr_of(mse: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse.mean(-1))  # data range 1; inf for identical sets


# metric -> (per-image columns it needs, statistic). A statistic reduces the last axis, so it takes columns (N,)
# for the point value or (R, N) for R resamples at once.
FIDELITY_STATS = {
    "rel_l1": (("l1_num", "l1_den"), lambda c: c["l1_num"].sum(-1) / np.maximum(c["l1_den"].sum(-1), 1e-12)),
    "psnr_db": (("mse",), lambda c: _psnr_of(c["mse"])),
    "ssim": (("ssim",), lambda c: c["ssim"].mean(-1)),
    "class_acc": (("class_hit",), lambda c: c["class_hit"].mean(-1)),
}


def bootstrap_interval(columns: dict[str, np.ndarray], statistic, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval over images (Efron & Tibshirani 1993, ch. 13) of `statistic`: `resamples`
    draws of N image indices with replacement (rng.integers(0, N, (R, N)), numpy's default_generator(seed): the
    same draws row by row as R calls of rng.integers(0, N, N)), the statistic of each, and its (1 - level) / 2 and
    (1 + level) / 2 quantiles. `columns` holds per-image arrays (N,) of equal length."""
    lengths = {len(np.asarray(v)) for v in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise DifaError(f"the bootstrap needs per-image columns of one non-zero length, got lengths {sorted(lengths)}")
    if not (0 < level < 1 and resamples >= 1):
        raise DifaError(f"bootstrap needs 0 < level < 1 and resamples >= 1 (got level={level}, resamples={resamples})")
    (n,) = lengths
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (R, N)
    stats = np.asarray(statistic({k: np.asarray(v, dtype=np.float64)[idx] for k, v in columns.items()}), dtype=np.float64)
    # PSNR of identical images is inf, and linear interpolation between infs is NaN: take the nearest order statistic
    method = "linear" if np.isfinite(stats).all() else "nearest"
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], method=method)
    return float(lo), float(hi)


def metric_intervals(per_image: dict[str, np.ndarray], **kw) -> dict[str, float]:
    """{metric: value, metric_lo: .., metric_hi: ..} for every FIDELITY_STATS metric whose columns are present."""
    out = {}
    for name, (needs, stat) in FIDELITY_STATS.items():
        if all(k in per_image for k in needs):
            cols = {k: np.asarray(per_image[k], dtype=np.float64) for k in needs}
            out[name] = float(stat(cols))
            out[f"{name}_lo"], out[f"{name}_hi"] = bootstrap_interval(cols, stat, **kw)
    return out


# -- memory ---------------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory in MB while the `with` block runs.

    CUDA device: `torch.cuda.max_memory_allocated` (exact, tensors only). Otherwise the process's resident set
    size sampled every 10 ms by a thread: coarse, process-wide (weights, Python, freed-but-kept heap included).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak_sampled"
        self.mb = 0.0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._peak = _rss()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mb = max(self._peak, _rss()) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self._peak = max(self._peak, _rss())


def _rss() -> int:
    import psutil  # a dependency of accelerate

    return psutil.Process().memory_info().rss
