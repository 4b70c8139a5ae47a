"""experiments/collect.py on a synthetic multirun folder and on a real joblib sweep of difa.evaluate; the
launcher configs in conf/hydra/launcher compose."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from difa.calibration import fixed_plan
from difa.cli.common import CONF_DIR, REPO_ROOT, load_model, model_config

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import collect  # noqa: E402

COLUMNS = ["method", "rel_l1", "attn_flops", "s_per_image", "fid", "model", "plan", "n", "steps", "guidance_scale",
           "seed"]


def job(root: Path, num: int, overrides: list[str], rows: list[tuple]) -> Path:
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    pd.DataFrame(rows, columns=COLUMNS).to_csv(d / "evaluate.csv", index=False)
    return d


def plan_file(path: Path, calibration: dict) -> str:
    path.write_text(json.dumps({"schema": "difa.plan", "calibration": calibration}))
    return str(path)


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Four evaluate jobs on model m: two thresholds (plan files), one restricted to ast, one preset; plus a job
    folder without a CSV."""
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    every = ["tgate", "ast", "wars", "asc", "wars+asc", "tome", "agent"]
    p1 = plan_file(tmp_path / "m_d0.05.json", {"threshold": 0.05, "candidates": every})
    p2 = plan_file(tmp_path / "m_d0.1.json", {"threshold": 0.1, "candidates": ["forecast"], "search": "trajectory"})
    p3 = plan_file(tmp_path / "m_ast.json", {"threshold": 0.1, "candidates": ["ast"]})

    def rows(method, plan, flops, secs, fid, base_secs):
        return [("baseline", 0.0, 1.0, base_secs, 10.0, "m", plan, 8, 4, 4.0, 0),
                (method, 0.01, flops, secs, fid, "m", plan, 8, 4, 4.0, 0)]

    job(root, 0, ["+model=m", f"plan={p1}", "fid=false"], rows("m_d0.05", p1, 0.5, 0.8, 11.0, 1.0))
    job(root, 1, ["+model=m", f"plan={p2}", "fid=false"], rows("m_d0.1", p2, 0.3, 0.6, 12.0, 1.2))
    job(root, 2, ["+model=m", f"plan={p3}", "+tag=ast only"], rows("m_ast", p3, 0.2, 0.5, 14.0, 1.0))
    job(root, 10, ["+model=m", "plan=preset:tomesd", "ratio=0.5"],
        rows("preset_tomesd", "preset:tomesd", 0.4, 0.9, 13.0, 1.0))
    (root / "3" / ".hydra").mkdir(parents=True)
    (root / "3" / ".hydra" / "overrides.yaml").write_text("- +model=m\n")
    return root


def test_job_dirs_in_sweep_order(sweep):
    assert [p.name for p in collect.job_dirs(sweep)] == ["0", "1", "2", "3", "10"]


def test_collect_rows_families_and_relative_latency(sweep, capsys):
    df = collect.collect([sweep])
    assert len(df) == 8 and "without an evaluate CSV skipped" in capsys.readouterr().err
    plans = df[df.method != "baseline"].set_index("method")
    assert plans.family.to_dict() == {"m_d0.05": "difa-greedy", "m_d0.1": "difa", "m_ast": "ast only",
                                      "preset_tomesd": "tomesd"}
    assert plans.loc["m_d0.1", "rel_latency"] == pytest.approx(0.5)  # 0.6 s against its own job's 1.2 s
    assert plans.loc["m_d0.05", "threshold"] == 0.05 and math.isnan(plans.loc["preset_tomesd", "threshold"])
    assert plans.loc["preset_tomesd", "ratio"] == 0.5
    assert (df.fid.notna()).all()  # the fid=false switch does not overwrite the metric column
    assert (df[df.method == "baseline"].rel_latency == 1.0).all()


@pytest.mark.parametrize("candidates, family", [
    (["asc", "wars"], "difa[wars+asc]"),
    (["tome"], "difa[tome]"),
    (["wars+asc", "asc", "wars", "ast"], "ditfastattn"),
    (["tgate", "ast", "wars", "asc", "wars+asc", "tome", "agent"], "difa-greedy"),
    (["ast", "wars", "asc", "wars+asc", "tome", "agent"], "difa-greedy"),  # tgate skipped on a DiT
])
def test_family_from_the_plan_candidates(tmp_path, candidates, family):
    p = plan_file(tmp_path / "p.json", {"threshold": 0.1, "candidates": candidates})
    assert collect.family_of(pd.Series({"method": "p", "plan": p})) == family


def test_family_of_an_unreadable_plan_is_the_method(tmp_path):
    assert collect.family_of(pd.Series({"method": "x", "plan": str(tmp_path / "missing.json")})) == "x"


def test_markdown_merges_baselines(sweep):
    text = collect.model_tables(collect.collect([sweep]))
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["family", "method"] and "threshold" in header and "ratio" in header
    assert "plan" not in header and "fid" in header and "rel_latency" in header
    body = lines[1:]
    assert len(body) == 5 and body[0].startswith("| baseline | baseline |")
    assert "baseline runs of the jobs with the same steps, n, seed and guidance scale (4 jobs)" in text
    base = dict(zip(header, [c.strip() for c in body[0].strip("|").split("|")]))
    assert base["s_per_image"] == "1.05"  # (1.0 + 1.2 + 1.0 + 1.0) / 4


def test_main_writes_csv_markdown_pareto_and_heatmaps(sweep, tmp_path):
    from tests.test_plots import make_plan

    plan = make_plan().save(tmp_path / "real_plan.json")
    out = tmp_path / "results"
    assert collect.main([str(sweep), "--out", str(out), "--y", "rel_l1", "--plan", str(plan)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps", "matched.md", "pareto_m.png", "results.csv", "results.md"]
    assert [p.name for p in (out / "heatmaps").iterdir()] == ["real_plan.png"]
    assert len(pd.read_csv(out / "results.csv")) == 8


def test_main_without_results_is_one_line_error(tmp_path, capsys):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("[]\n")
    assert collect.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("collect: error: no evaluate CSV") and "hydra:runtime.output_dir" in err[-1]
    assert collect.main([str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("launcher, target, key, value", [
    ("local", "JoblibLauncher", "n_jobs", 2),
    ("slurm", "SlurmLauncher", "gpus_per_node", 1),
])
def test_launcher_configs_compose(launcher, target, key, value):
    for app in ("evaluate", "calibrate"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=app, overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith(target) and cfg.hydra.launcher[key] == value


@pytest.mark.slow
def test_joblib_sweep_of_evaluate_then_collect(tmp_path):
    """The README's sweep shape on the tiny model: two plans in parallel jobs, one CSV per job folder, collected."""
    torch.set_num_threads(1)
    pipe = load_model(model_config("tiny_dit"), "cpu", "float32")
    plans = [fixed_plan(pipe, lambda i, t, m=m: m, steps=3, guidance_scale=4.0, name="tiny_dit")
             .save(tmp_path / f"tiny_dit_{m}.json") for m in ("ast", "asc")]
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "difa.evaluate", "-m", "hydra/launcher=local", "+model=tiny_dit", "n=2", "batch=2",
           "fid=false", "warmup=false", "+tag=fixed", f"plan={plans[0]},{plans[1]}", "out=${hydra:runtime.output_dir}/evaluate.csv",
           f"hydra.sweep.dir={sweep_dir}", f"baseline_cache={tmp_path / 'baseline'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr
    assert sorted(p.name for p in sweep_dir.glob("*/evaluate.csv")) == ["evaluate.csv"] * 2
    df = collect.collect([sweep_dir])
    assert sorted(df.method) == ["baseline", "baseline", "tiny_dit_asc", "tiny_dit_ast"]
    ast, asc = (df[df.method == f"tiny_dit_{m}"].iloc[0] for m in ("ast", "asc"))
    assert ast.attn_flops < asc.attn_flops < 1.0 and ast.family == asc.family == "fixed"


def test_job_dirs_mixes_single_runs_and_multiruns(tmp_path):
    """A single run (`<root>/baseline/.hydra`) next to multirun jobs (`<root>/sweep/<n>/.hydra`), numbers in order."""
    for job in ("baseline", "sweep/10", "sweep/9", "sweep/0"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text("[]\n")
    found = [p.relative_to(tmp_path).as_posix() for p in collect.job_dirs(tmp_path)]
    assert found == ["baseline", "sweep/0", "sweep/9", "sweep/10"]


def test_matched_latency_interpolation_against_numpy():
    import numpy as np

    x, y = [0.9, 0.3, 0.6, 0.6], [0.01, 0.3, 0.08, 0.05]  # unsorted; a repeated latency keeps its better point
    for at in (0.3, 0.4, 0.6, 0.75, 0.9):
        assert collect.at_latency(x, y, at) == pytest.approx(np.interp(at, [0.3, 0.6, 0.9], [0.3, 0.05, 0.01]))
    assert math.isnan(collect.at_latency(x, y, 0.2)) and math.isnan(collect.at_latency(x, y, 0.95))  # not reached
    df = pd.DataFrame({"model": "m", "method": ["a", "a", "b"], "family": ["fa", "fa", "fb"],
                       "rel_latency": [0.3, 0.9, 0.5], "rel_l1": [0.2, 0.02, 0.1]})
    table = collect.matched_table(df, at=(0.6,))
    assert "| fa | 2 | 0.110 |" in table and "| fb | 1 | – |" in table


def test_intervals_fold_into_the_tables_and_the_matched_latency_lines():
    """Bootstrap bounds are interpolated with the values, shown as [lo, hi], and each latency gets a line saying
    which family is lowest and whose intervals overlap it."""
    df = pd.DataFrame({"model": "m", "method": ["a1", "a2", "b1", "b2", "c1", "c2"],
                       "family": ["fa", "fa", "fb", "fb", "fc", "fc"],
                       "rel_latency": [0.3, 0.9, 0.3, 0.9, 0.3, 0.9], "rel_l1": [0.1, 0.02, 0.3, 0.1, 0.15, 0.05],
                       "rel_l1_lo": [0.08, 0.01, 0.25, 0.08, 0.1, 0.04], "rel_l1_hi": [0.12, 0.03, 0.35, 0.12, 0.2, 0.06]})
    table = collect.matched_table(df, at=(0.6,))
    assert "| fa | 2 | 0.060 [0.045, 0.075] |" in table  # value and both bounds halfway between the two points
    assert "- at 0.6: lowest rel_l1 fa 0.060 [0.045, 0.075]; intervals overlap with fc" in table  # fc: [0.07, 0.13]
    df.loc[df.family == "fc", ["rel_l1_lo"]] = [0.12, 0.08]  # fc's interval at 0.6 now starts at 0.1 > 0.075
    assert "no other family's interval overlaps (2 others)" in collect.matched_table(df, at=(0.6,))
    folded = collect.fold_intervals(df.assign(rel_latency_min=0.25, rel_latency_max=0.95), ["rel_l1", "rel_latency"])
    assert folded.rel_l1.iloc[0] == "0.1 ± 0.02" and folded.rel_latency.iloc[0] == "0.3 (0.25–0.95)"


def test_csv_latency_is_kept_and_fid_axis_needs_enough_samples(tmp_path, sweep, capsys):
    d = sweep / "0"
    df = pd.read_csv(d / "evaluate.csv").assign(rel_latency=[1.0, 0.7])  # the median of paired batch ratios
    df.to_csv(d / "evaluate.csv", index=False)
    rows = collect.read_job(d)
    assert rows.rel_latency.tolist() == [1.0, 0.7]  # not recomputed from s_per_image (0.8)
    rows = collect.collect([sweep])
    assert collect.draw_pareto(rows, tmp_path, "rel_latency", "fid") == []  # n = 8 images: FID is bias
    assert "FID on the y axis needs n >= 2000" in capsys.readouterr().err
    paths = collect.draw_pareto(rows.assign(n=2000, ref_n=2000), tmp_path, "rel_latency", "fid")
    assert [p.name for p in paths] == ["pareto_m.png"]
