"""`python -m difa.evaluate`: composed in-process on tiny models, and one user error as a real subprocess."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from difa.calibration import fixed_plan
from difa import evaluation
from difa.cli import evaluate as evaluate_cli
from difa.cli.common import CONF_DIR, REPO_ROOT, load_model, model_config
from difa.errors import DifaError
from difa.zoo import FMNISTClassifier

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def config(overrides: list[str]):
    """The evaluate config; the baseline cache stays off unless a test turns it on (it would write under runs/)."""
    if not any(o.startswith("baseline_cache=") for o in overrides):
        overrides = [*overrides, "baseline_cache=null"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="evaluate", overrides=overrides)


@pytest.fixture(scope="module")
def ast_plan(tmp_path_factory):
    """A plan without calibration: every layer reuses its attention output after step 0."""
    pipe = load_model(model_config("tiny_dit"), "cpu", "float32")
    plan = fixed_plan(pipe, lambda layer, step: "ast", steps=STEPS, guidance_scale=4.0, name="tiny_dit")
    return plan.save(tmp_path_factory.mktemp("plan") / "tiny_dit_ast.json")


def test_baseline_and_plan_side_by_side(tmp_path, ast_plan, capsys):
    out = tmp_path / "eval.csv"
    cfg = config(["+model=tiny_dit", f"plan={ast_plan}", "n=4", "batch=2", "fid=false", f"out={out}"])
    table, path = evaluate_cli.run(cfg)
    assert path == out and list(table.method) == ["baseline", "tiny_dit_ast"]
    base, plan = table.iloc[0], table.iloc[1]
    assert base.rel_l1 == 0.0 and base.psnr_db == math.inf and base.ssim == pytest.approx(1.0)
    assert base.attn_flops == 1.0 and plan.attn_flops < 0.5  # ast after step 0 of 4: only step 0 computes
    assert plan.rel_l1 > 0 and plan.psnr_db < math.inf
    assert (table.s_per_image > 0).all() and (table.peak_mem_mb > 0).all()
    assert "fid" not in table and "class_acc" not in table
    saved = pd.read_csv(out)
    assert list(saved.method) == ["baseline", "tiny_dit_ast"] and (saved.n == 4).all() and (saved.steps == STEPS).all()
    printed = capsys.readouterr().out
    assert "tiny_dit_ast" in printed and "FID and class accuracy skipped" in printed and str(out) in printed


def test_same_seeds_give_the_same_baseline(tmp_path, monkeypatch):
    """Batches are seeded per index, so the baseline images do not depend on the batch size."""
    seen = []
    original = evaluation.score

    def keep_images(methods, *args, **kwargs):
        seen.append(torch.cat(methods[0].images))
        return original(methods, *args, **kwargs)

    monkeypatch.setattr(evaluation, "score", keep_images)
    for batch in (1, 3):
        evaluate_cli.run(config(["+model=tiny_dit", "n=3", f"batch={batch}", f"steps={STEPS}", "fid=false",
                                 "warmup=false", f"out={tmp_path / f'b{batch}.csv'}"]))
    assert not torch.equal(seen[0][0], seen[0][1])  # every image has its own noise
    torch.testing.assert_close(seen[0][:1], seen[1][:1], atol=1e-4, rtol=0)


def test_class_accuracy_with_a_classifier_dir(tmp_path, capsys):
    torch.manual_seed(0)
    FMNISTClassifier().save_pretrained(tmp_path / "clf")
    cfg = config(["+model=tiny_dit", "+model.dataset=fmnist", "n=4", "batch=4", f"steps={STEPS}", "fid=false",
                  "warmup=false", f"classifier={tmp_path / 'clf'}", f"out={tmp_path / 'e.csv'}"])
    table, _ = evaluate_cli.run(cfg)
    assert 0.0 <= table.class_acc.iloc[0] <= 1.0
    assert "FID skipped" in capsys.readouterr().out
    cfg = config(["+model=tiny_dit", "+model.dataset=fmnist", "n=2", f"steps={STEPS}", "fid=false", "warmup=false",
                  f"classifier={tmp_path / 'missing'}", f"out={tmp_path / 'e.csv'}"])
    table, _ = evaluate_cli.run(cfg)
    assert "class_acc" not in table and "class accuracy skipped" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["n=0"], r"n must be an integer in \[1, 100000\], got 0"),
    (["batch=0"], r"batch must be an integer in \[1, 4096\], got 0"),
    (["n=many"], "n must be an integer"),
    (["+model.dataset=fmnist", "fid=true", "n=1"], "FID needs n >= 2"),
    (["model.resolution=64"], "config hash"),
    (["fid_source=tf"], "unknown fid_source"),
    (["plan=/nonexistent.json"], "does not exist"),
    (["skip=2"], "skip do not apply to a plan file"),
    (["plan=diffusers:teacache"], "unknown diffusers hook"),
    (["plan=diffusers:fbc", "skip=2"], "skip do not apply to diffusers:fbc"),
    (["plan=diffusers:pab", "skip=0"], "skip must be an integer >= 1"),
    (["plan=diffusers:pab", "timestep_range=[800,100]"], "low < high"),
    (["time_batches=0"], "time_batches must be"),
    (["plan=cachedit:dbcache", "fn_blocks=0"], "fn_blocks must be an integer >= 1"),
    (["plan=cachedit:dbcache", "skip=2"], "skip do not apply to cachedit:dbcache"),
])
def test_bad_arguments(ast_plan, overrides, message):
    plan = [] if any(o.startswith("plan=") for o in overrides) else [f"plan={ast_plan}"]
    base = ["+model=tiny_dit", "fid=false", *plan]
    with pytest.raises(DifaError, match=message):
        evaluate_cli.run(config(base + overrides))


def test_user_error_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "difa.evaluate", "+model=tiny_dit", "n=0", f"hydra.run.dir={tmp_path}"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "difa: error: n must be an integer in [1, 100000], got 0"
    r = subprocess.run([sys.executable, "-m", "difa.evaluate", "model=tiny_dit"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "+model=tiny_dit" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fid_against_the_fashion_mnist_test_split(tmp_path, ast_plan, capsys):
    """The whole FID path on a tiny model posing as a Fashion-MNIST one (its images are noise, so FID is large)."""
    cfg = config(["+model=tiny_dit", "+model.dataset=fmnist", f"plan={ast_plan}", "n=4", "batch=4", "ref_n=6",
                  "warmup=false", f"cache_dir={tmp_path / 'cache'}", f"classifier={tmp_path / 'none'}",
                  f"out={tmp_path / 'e.csv'}"])
    table, _ = evaluate_cli.run(cfg)
    assert (table.fid > 0).all() and "inception_score" not in table
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fmnist-test_n6_fid-helper_v1.npy"]
    assert "Inception Score not available" in capsys.readouterr().out


def test_total_macs_are_counted_per_method(tmp_path, ast_plan):
    table, _ = evaluate_cli.run(config(["+model=tiny_dit", f"plan={ast_plan}", "n=2", "batch=2", "fid=false",
                                        "warmup=false", f"out={tmp_path / 'e.csv'}"]))
    base, plan = table.iloc[0], table.iloc[1]
    assert base.macs == 1.0 and base.gmacs_per_image > 0
    # ast skips attention's Q.K^T, P.V and the projections after step 0; MLPs and the VAE still run
    assert 0.5 < plan.macs < 1.0 and plan.gmacs_per_image == pytest.approx(base.gmacs_per_image * plan.macs)
    assert base.rel_latency == 1.0 and plan.rel_latency > 0


def test_baseline_cache_reuses_identical_images(tmp_path, ast_plan, capsys, monkeypatch):
    seen = []
    original = evaluation.score

    def keep_images(methods, *args, **kwargs):
        seen.append([torch.cat(m.images) for m in methods])
        return original(methods, *args, **kwargs)

    monkeypatch.setattr(evaluation, "score", keep_images)
    cache = tmp_path / "baseline"
    common = ["+model=tiny_dit", f"plan={ast_plan}", "n=6", "batch=2", "fid=false", "warmup=false",
              f"baseline_cache={cache}", "time_batches=1"]
    first, _ = evaluate_cli.run(config(common + [f"out={tmp_path / 'a.csv'}"]))
    assert "baseline images from" not in capsys.readouterr().out and len(list(cache.glob("*.pt"))) == 1
    second, _ = evaluate_cli.run(config(common + [f"out={tmp_path / 'b.csv'}"]))
    assert "baseline images from" in capsys.readouterr().out
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    assert second.rel_l1.iloc[1] == first.rel_l1.iloc[1]
    saved = pd.read_csv(tmp_path / "b.csv")
    assert list(saved.timed_images) == [2, 2]  # both timed on the first batch only, side by side
    evaluate_cli.run(config(common + ["seed=1", f"out={tmp_path / 'c.csv'}"]))  # other seeds: another entry
    assert len(list(cache.glob("*.pt"))) == 2


@pytest.mark.parametrize("hook", ["pab", "fbc"])
def test_diffusers_hooks_side_by_side(tmp_path, hook):
    extra = ["skip=3"] if hook == "pab" else ["threshold=10"]
    table, _ = evaluate_cli.run(config(["+model=tiny_dit", f"plan=diffusers:{hook}", *extra, f"steps={STEPS}", "n=2",
                                        "batch=2", "fid=false", "warmup=false", f"out={tmp_path / 'e.csv'}"]))
    assert list(table.method) == ["baseline", f"diffusers_{hook}"]
    row = table.iloc[1]
    assert row.attn_flops < 1.0 and row.macs < 1.0 and row.rel_l1 > 0


def test_predicted_latency_next_to_measured(tmp_path):
    """A budget plan's predicted latency (the measured cost model) is printed next to the measured one."""
    from difa.calibration import calibrate_pipeline

    pipe = load_model(model_config("tiny_dit"), "cpu", "float32")
    # 0.95: the fastest plan at 4 steps is about 0.8 of full, and a loaded machine inflates the fixed costs
    plan = calibrate_pipeline(pipe, [1, 2], threshold=0.05, budget=0.95, steps=STEPS, guidance_scale=4.0,
                              name="tiny_dit", latency_cache=None)
    path = plan.save(tmp_path / "budget.json")
    table, _ = evaluate_cli.run(config(["+model=tiny_dit", f"plan={path}", "n=2", "batch=2", "fid=false",
                                        f"out={tmp_path / 'e.csv'}"]))
    base, row = table.iloc[0], table.iloc[1]
    assert base.pred_latency == 1.0 and row.pred_latency == plan.latency["predicted_fraction"] <= 0.95
    assert row.rel_latency > 0


def test_a_plan_runs_at_another_step_count(ast_plan, tmp_path, caplog):
    """Another `steps=` maps the plan (difa.retime_plan) with a warning, instead of refusing it."""
    cfg = config(["+model=tiny_dit", f"plan={ast_plan}", f"steps={STEPS + 2}", "n=2", "fid=false", "warmup=false",
                  f"out={tmp_path / 'e.csv'}"])
    with caplog.at_level("WARNING", logger="difa"):
        table, _ = evaluate_cli.run(cfg)
    assert f"calibrated at {STEPS} steps and runs at {STEPS + 2}" in caplog.text and len(table) == 2


def test_intervals_and_per_image_rows_in_the_csv(tmp_path, ast_plan):
    """Every fidelity metric carries its 95% bootstrap interval, latency its spread over the timed batches, and
    the per-image file holds what they were computed from."""
    table, out = evaluate_cli.run(config(["+model=tiny_dit", f"plan={ast_plan}", "n=6", "batch=2", "fid=false",
                                          "warmup=false", "time_batches=3", f"out={tmp_path / 'e.csv'}"]))
    saved = pd.read_csv(out)
    row = saved.iloc[1]
    for k in ("rel_l1", "psnr_db", "ssim"):
        assert row[f"{k}_lo"] <= row[k] <= row[f"{k}_hi"] and row[f"{k}_lo"] < row[f"{k}_hi"]
    assert row.rel_latency_min <= row.rel_latency <= row.rel_latency_max and row.timed_batches == 3
    images = pd.read_csv(tmp_path / "e_images.csv")
    assert list(images.method) == ["baseline"] * 6 + [row.method] * 6
    mine = images[images.method == row.method]
    assert mine.l1_num.sum() / mine.l1_den.sum() == pytest.approx(row.rel_l1, rel=1e-9)
    assert (images[images.method == "baseline"].l1_num == 0).all()


def test_latency_spread_is_the_median_of_paired_batch_ratios():
    got = evaluation.latency_spread([0.5, 0.9, 0.3], [1.0, 1.0, 0.5])  # ratios 0.5, 0.9, 0.6
    assert got == {"rel_latency": 0.6, "rel_latency_min": 0.5, "rel_latency_max": 0.9, "timed_batches": 3}
    assert math.isnan(evaluation.latency_spread([], [])["rel_latency"])


@pytest.mark.parametrize("spec, extra", [("diffusers:magcache", ["threshold=0.5"]),
                                         ("smoothcache:calibrate", ["threshold=0.5", "lookahead=2"])])
def test_peers_that_calibrate_report_what_it_cost(tmp_path, spec, extra, capsys):
    pytest.importorskip("SmoothCache") if spec.startswith("smoothcache") else None
    table, out = evaluate_cli.run(config(["+model=tiny_dit", f"plan={spec}", *extra, f"steps={STEPS}", "n=2",
                                          "batch=2", "fid=false", "warmup=false", f"out={tmp_path / 'e.csv'}"]))
    saved = pd.read_csv(out)
    assert list(saved.calib_forwards) == [0, STEPS] and saved.calib_s.iloc[1] > 0
    images = 1 if spec == "diffusers:magcache" else 2  # MagCache calibrates on one input, SmoothCache on up to 10
    assert f"{spec} calibrated on {images} image(s) in one batch: {STEPS} denoiser forwards" in capsys.readouterr().out
    assert table.rel_l1.iloc[1] > 0
    assert (tmp_path / "e_smoothcache.json").is_file() == spec.startswith("smoothcache")
