"""Hostile inputs: a plan never chooses which model config (and so which weights) is loaded; side files are never
written through planted links, FIFOs are never read; each refusal is one line and changes nothing on disk."""

from __future__ import annotations

import os
import threading

import pytest

from difa.cli import calibrate as calibrate_cli
from difa.cli.common import model_config, plan_model_config
from difa.errors import DifaError
from difa.plan import ModelIdentity, Plan
from tests.conftest import STEPS
from tests.test_cli import config

CALIBRATE = ["+model=tiny_dit", f"steps={STEPS}", "n_calib=2"]


def one_line(fn, match: str) -> None:
    with pytest.raises(DifaError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["../tiny_dit", "/etc/hostname", "tiny_dit/../tiny_dit", "..", "", "a\\b"])
def test_a_plan_or_default_model_names_a_model_never_a_path(name, tmp_path):
    (tmp_path / "evil.yaml").write_text("path: /tmp\n")  # what a traversal would reach
    plan = Plan(ModelIdentity("DiTTransformer2DModel", "0" * 16, ("a.attn1",), name=name), "S", 1, (("full",),))
    one_line(lambda: plan_model_config(plan), "has no model config")
    one_line(lambda: model_config(name), "no model config")
    one_line(lambda: model_config(str(tmp_path / "evil")), "no model config")
    one_line(lambda: calibrate_cli.run(config("calibrate", [f"default_model={name}", f"out={tmp_path / 'p.json'}"])),
             "no model config")


@pytest.mark.parametrize("side", ["heatmap", "checkpoint"])
def test_side_files_are_never_written_through_a_planted_link(side, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "p.json"
    link = out.with_suffix(".png") if side == "heatmap" else tmp_path / ".p.json.calib.json"
    link.symlink_to(victim)
    args = CALIBRATE + (["search=greedy", "threshold=0.1"] if side == "checkpoint" else []) + [f"out={out}"]
    one_line(lambda: calibrate_cli.run(config("calibrate", args)), "link")
    assert victim.read_text() == "precious" and link.is_symlink() and not out.exists()


def test_a_fifo_at_the_checkpoint_is_refused_not_read(tmp_path):
    out = tmp_path / "p.json"
    os.mkfifo(tmp_path / ".p.json.calib.json")
    result = {}

    def run():
        try:
            calibrate_cli.run(config("calibrate", CALIBRATE + ["search=greedy", "threshold=0.1", f"out={out}"]))
        except DifaError as e:
            result["error"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "calibration hung reading the FIFO"
    assert "pipe" in result.get("error", "") and "\n" not in result["error"] and not out.exists()


def test_a_folder_at_the_lock_and_a_png_out_are_one_line_errors(tmp_path):
    out = tmp_path / "p.json"
    (tmp_path / ".p.json.lock").mkdir()
    one_line(lambda: calibrate_cli.run(config("calibrate", CALIBRATE + [f"out={out}"])), "not a regular file")
    one_line(lambda: calibrate_cli.run(config("calibrate", CALIBRATE + [f"out={tmp_path / 'x.png'}"])),
             "its own heatmap")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".p.json.lock"]


@pytest.mark.parametrize("kw, match", [
    (dict(threshold=float("nan")), "must be a number >= 0"),
    (dict(threshold=float("inf")), "must be a number >= 0"),
    (dict(steps=10**9), r"steps must be an integer in \[1, 10000\]"),
    (dict(latency_batch=10**12), r"latency_batch must be an integer in \[1, 4096\]"),
    (dict(inputs=[5000]), r"class ids must be integers in \[0, "),
    (dict(inputs=[1, "a red bird"]), "inputs mix class ids and prompts"),
    (dict(inputs="1"), "non-empty list"),
])
def test_the_python_api_checks_what_the_cli_checks(kw, match):
    """calibrate_pipeline refuses, in one line and before any forward, what the CLI refuses."""
    from difa.calibration import calibrate_pipeline
    from tests.conftest import GUIDANCE, tiny

    args = dict(inputs=[1, 2], threshold=0.05, steps=STEPS, guidance_scale=GUIDANCE["dit"], latency_cache=None)
    args.update(kw)
    pipe = tiny("dit")
    one_line(lambda: calibrate_pipeline(pipe, args.pop("inputs"), **args), match)


def test_class_ids_on_a_text_model_and_huge_counts_are_one_line_errors(tmp_path):
    from difa.calibration import calibrate_pipeline
    from tests.conftest import GUIDANCE, tiny

    pipe = tiny("pixart")
    one_line(lambda: calibrate_pipeline(pipe, [1, 2], threshold=0.05, steps=STEPS, guidance_scale=GUIDANCE["pixart"]),
             "text model: inputs must be non-empty prompts")
    one_line(lambda: calibrate_cli.run(config("calibrate", CALIBRATE[:-1] + ["n_calib=1000000000000",
                                                                             f"out={tmp_path / 'p.json'}"])),
             "n_calib must be an integer in")


def test_caches_are_never_read_or_written_through_a_planted_link(tmp_path):
    """The latency cache and evaluate's baseline cache: a run writes them; a link planted in place of the file
    afterwards is refused in one line, and the file it points to is neither read nor overwritten."""
    from difa.calibration import calibrate_pipeline
    from difa.evaluation import evaluate
    from tests.conftest import GUIDANCE, tiny

    pipe = tiny("dit")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")

    def plant(folder):
        written = [p for p in folder.iterdir() if p.is_file()]
        assert written
        for p in written:
            p.unlink()
            p.symlink_to(victim)

    latency = tmp_path / "latency"
    calib = dict(threshold=0.05, steps=STEPS, guidance_scale=GUIDANCE["dit"], latency_cache=latency)
    calibrate_pipeline(pipe, [1, 2], **calib)
    plant(latency)
    one_line(lambda: calibrate_pipeline(pipe, [1, 2], **calib), "the latency cache .* is a link")
    model = {"name": "tiny_dit", "family": "dit", "tiny": "dit", "path": None, "steps": STEPS, "guidance_scale": 4.0}
    baseline = tmp_path / "baseline"
    run = dict(pipe=pipe, model=model, n=2, batch=2, fid=False, warmup=False, classifier="none",
               baseline_cache=baseline, time_batches=None)
    evaluate(**run)
    plant(baseline)
    one_line(lambda: evaluate(**run), "the baseline cache .* is a link")
    assert victim.read_text() == "precious"
