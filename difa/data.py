"""Fashion-MNIST for the small latent DiT / PixArt models: idx reader, loader, model-space images and captions.

The 10k test split is committed under `data/fashion-mnist/` (see its README); the 60k train split is read from
the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difa.errors import DifaError

FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The committed test split: data/fashion-mnist in a checkout, difa/bundled/fashion-mnist in an installed wheel.
TEST_ROOT = next((d for d in (Path(__file__).resolve().parent / "bundled" / "fashion-mnist",
                              Path(__file__).resolve().parent.parent / "data" / "fashion-mnist") if d.is_dir()),
                 Path(__file__).resolve().parent.parent / "data" / "fashion-mnist")
TRAIN_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get install dataset-fashion-mnist"
PREFIX = {"test": "t10k", "train": "train"}
CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a black and white picture of a {}",
    "a {} on a black background",
    "a small grayscale {}",
)

# idx type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (gzip-compressed or plain) into an array of its declared dtype and shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DifaError(f"idx file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DifaError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DifaError(f"{path}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DifaError(f"{path}: truncated idx header ({len(raw)} bytes, expected {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DifaError(f"{path}: idx data is {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fmnist(split: str = "test", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 (N, 1, 28, 28) in [0, 1] and labels int64 (N,) of one Fashion-MNIST split."""
    if split not in PREFIX:
        raise DifaError(f"unknown Fashion-MNIST split {split!r}: use 'test' or 'train'")
    root = Path(root) if root is not None else (TEST_ROOT if split == "test" else TRAIN_ROOT)
    img_path = root / f"{PREFIX[split]}-images-idx3-ubyte.gz"
    lbl_path = root / f"{PREFIX[split]}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            hint = f"run `{INSTALL}`" if split == "train" else "restore data/fashion-mnist/ from the repo"
            raise DifaError(f"Fashion-MNIST {split} split not found ({p} missing): {hint}")
    images, labels = read_idx(img_path), read_idx(lbl_path)  # (N, 28, 28) uint8, (N,) uint8
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DifaError(f"Fashion-MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28) in [0, 1]
    return x, torch.from_numpy(labels).long()  # labels (N,) int64


def to_model_space(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (N, 3, size, size) in [-1, 1]: zero (black) padding centred, gray repeated to RGB."""
    h, w = images.shape[-2:]
    if images.ndim != 4 or images.shape[1] != 1 or h > size or w > size:
        raise DifaError(f"to_model_space expects (N, 1, H<={size}, W<={size}) images, got {tuple(images.shape)}")
    top, left = (size - h) // 2, (size - w) // 2
    x = F.pad(images, (left, size - w - left, top, size - h - top))  # (N, 1, size, size), 28 -> 32: 2 px each side
    return (x * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size)


def captions(
    labels: torch.Tensor | Sequence[int], templates: Sequence[str] = CAPTION_TEMPLATES, seed: int = 0
) -> list[str]:
    """One caption per label: a template (drawn per index from a generator seeded with `seed`) with the class name."""
    labels = [int(y) for y in labels]
    if any(not 0 <= y < len(FMNIST_CLASSES) for y in labels):
        raise DifaError(f"captions: labels must be in 0..{len(FMNIST_CLASSES) - 1}, got {sorted(set(labels))}")
    picks = np.random.default_rng(seed).integers(len(templates), size=len(labels))  # (N,)
    return [templates[t].format(FMNIST_CLASSES[y]) for t, y in zip(picks, labels)]


SYNTHETIC = "synthetic:"  # an image input `synthetic:<seed>`: a deterministic test image (tiny image-to-video runs)
SYNTHETIC_SIZE = 64


def load_images(items: Sequence) -> list:
    """Image inputs (image-to-video models) as RGB PIL images: PIL images as they are, `synthetic:<seed>` as a smooth
    random colour field (64 px, the same for the same seed), anything else as an image file path (a `data/...` path
    names a bundled file, as model paths do)."""
    from PIL import Image

    from difa.models import resolve_path

    out = []
    for x in items:
        if isinstance(x, Image.Image):
            out.append(x.convert("RGB"))
        elif isinstance(x, str) and x.startswith(SYNTHETIC):
            seed = x[len(SYNTHETIC):]
            if not seed.isdigit():
                raise DifaError(f"image input {x!r}: write synthetic:<integer seed>, e.g. synthetic:0")
            coarse = np.random.RandomState(int(seed)).rand(4, 4, 3).astype(np.float32)  # (4, 4, 3) in [0, 1)
            field = F.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=SYNTHETIC_SIZE,
                                  mode="bilinear", align_corners=False)[0]  # (3, 64, 64)
            out.append(Image.fromarray((field.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        elif isinstance(x, (str, Path)):
            path = Path(resolve_path(x))
            if not path.is_file():
                raise DifaError(f"image input {str(x)!r} is not a file; give image paths or synthetic:<seed>")
            try:
                out.append(Image.open(path).convert("RGB"))
            except OSError as e:
                raise DifaError(f"image input {str(x)!r} is not a readable image ({e})") from None
        else:
            raise DifaError(f"image inputs are file paths or synthetic:<seed>, not {type(x).__name__} {x!r}")
    return out
