"""Checkpoints of the greedy search: each decided step's column of methods (and its decision records) written
atomically next to the plan (`.<plan name>.calib.json`), so that the same command after a kill replays the decided
steps without trials and continues; the file is removed once the plan is saved. A file made with other settings
(model, inputs, steps, threshold, candidates, ...) is ignored and replaced."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from difa.files import check_side_file, write_atomic


class Checkpoint:
    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.path = out.parent / f".{out.name}.calib.json"
        self.key = ""
        self.steps: dict[int, tuple[list[str], list[dict]]] = {}

    def start(self, settings: Mapping[str, Any]) -> dict[int, tuple[list[str], list[dict]]]:
        """Bind to the calibration's settings; return the steps a killed run with the same settings decided."""
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        check_side_file(self.path, "the checkpoint")  # never read a FIFO (it would hang) or follow a link
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == self.key:
            self.steps = {int(t): (list(c), list(r)) for t, (c, r) in saved.get("steps", {}).items()}
        return dict(self.steps)

    def save(self, step: int, column: list[str], records: list[dict]) -> None:
        self.steps[step] = (list(column), list(records))
        text = json.dumps({"key": self.key, "steps": {str(t): v for t, v in sorted(self.steps.items())}})
        write_atomic(self.path, lambda f: f.write(text), binary=False, what="checkpoint", follow=False)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
