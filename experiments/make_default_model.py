"""Write the bundled tiny random-weight pipelines to data/models/tiny-{dit,pixart,sd}/.

    python experiments/make_default_model.py

Each is `build_tiny_pipeline(family, seed=0, sample_size=SAMPLE_SIZE[family])` saved as safetensors, 1-3 MB; `data/models/tiny-dit` is the
default model. Load one with `load_pipeline({"pipeline": ..., "path": "data/models/tiny-dit", "tiny": None})`.
"""

from pathlib import Path

from difa.models import build_tiny_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]  # writes into the checkout's data/ (shipped as difa/bundled)

SEED = 0
# Latent side per family: 16 -> 8x8 = 64 image tokens for DiT/PixArt (patch 2); the UNet's top level has 8x8.
SAMPLE_SIZE = {"dit": 16, "pixart": 16, "sd": 8}
MODELS_DIR = REPO_ROOT / "data" / "models"
MAX_BYTES = 5 * 2**20


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    for family in ("dit", "pixart", "sd"):
        out = MODELS_DIR / f"tiny-{family}"
        build_tiny_pipeline(family, seed=SEED, sample_size=SAMPLE_SIZE[family]).save_pretrained(out, safe_serialization=True)
        size = directory_bytes(out)
        assert size < MAX_BYTES, f"{out} is {size / 2**20:.1f} MB, over the {MAX_BYTES / 2**20:.0f} MB budget"
        print(f"{out.relative_to(REPO_ROOT)}: {size / 2**20:.2f} MB")
    print(f"total: {directory_bytes(MODELS_DIR) / 2**20:.2f} MB")


if __name__ == "__main__":
    main()
