"""The bundled models' training script: its learning-rate schedule and argument checks (no training here)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_fmnist", ROOT / "experiments" / "train_fmnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def naive_lr(step, lr, warmup, max_steps, decay_steps):
    lr_step = lr * min(1.0, (step + 1) / warmup)
    if decay_steps and step > max_steps - decay_steps:
        lr_step *= (max_steps - step) / decay_steps
    return lr_step


@pytest.mark.parametrize("decay_steps", [0, 30])
def test_lr_schedule_warmup_constant_decay(train, decay_steps):
    args = argparse.Namespace(lr=4e-4, warmup=10, max_steps=100, decay_steps=decay_steps)
    got = [train.lr_at(s, args) for s in range(101)]
    want = [naive_lr(s, 4e-4, 10, 100, decay_steps) for s in range(101)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert got[50] == pytest.approx(4e-4)  # constant between warm-up and decay
    assert got[100] == (0.0 if decay_steps else pytest.approx(4e-4))


def test_decay_steps_needs_max_steps(train, capsys):
    with pytest.raises(SystemExit):
        train.main(["dit", "--decay-steps", "100"])
    assert "--decay-steps needs --max-steps" in capsys.readouterr().err
