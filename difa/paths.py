"""Where the Hydra configs live (no heavy imports: the CLIs read it before anything loads)."""

from __future__ import annotations

from pathlib import Path

# The repository's conf/ folder: package data under difa/conf in an installed wheel (pyproject maps the package
# difa.conf onto conf/), conf/ next to the package in a source checkout (editable install).
CONF_DIRS = (Path(__file__).resolve().parent / "conf", Path(__file__).resolve().parents[1] / "conf")


def conf_dir() -> Path:
    """The folder of the Hydra configs: package data in a wheel, conf/ in a checkout."""
    return next((d for d in CONF_DIRS if (d / "calibrate.yaml").is_file()), CONF_DIRS[-1])
