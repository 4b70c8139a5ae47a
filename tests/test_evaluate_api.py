"""difa.evaluation.evaluate called directly with plain values (no Hydra), on the tiny DiT the CLI tests use."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from difa.calibration import fixed_plan
from difa.cli import evaluate as evaluate_cli
from difa.cli.common import CONF_DIR
from difa.errors import DifaError
from difa.evaluation import Evaluation, evaluate
from difa.models import load_pipeline

STEPS = 4
SETTINGS = dict(n=2, batch=2, steps=STEPS, fid=False, warmup=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_config(name: str) -> dict:
    """A model config as plain Python values, read without OmegaConf."""
    return yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def tiny_dit():
    """(model config as a plain dict, its pipeline, a plan of all `full` cells, one of all `ast` cells)."""
    model = plain_config("tiny_dit")
    pipe = load_pipeline(model)
    plans = [fixed_plan(pipe, lambda layer, step, m=m: m, steps=STEPS, guidance_scale=4.0, name="tiny_dit")
             for m in ("full", "ast")]
    return model, pipe, *plans


def test_full_plan_is_exact_and_a_compressing_one_is_not(tiny_dit):
    model, pipe, full, ast = tiny_dit
    runs = {name: evaluate(model=model, pipe=pipe, plan=plan, label=name, **SETTINGS)
            for name, plan in (("all_full", full), ("all_ast", ast))}
    for name, result in runs.items():
        assert isinstance(result, Evaluation) and list(result.table.method) == ["baseline", name]
        assert result.name == f"tiny_dit_{name}_n2_s{STEPS}_g4.0_seed0"
        assert list(result.record.plan) == [name, name] and (result.record.n == 2).all()
        assert len(result.images) == 4 and set(result.images.method) == {"baseline", name}
    exact = runs["all_full"].table.iloc[1]
    assert exact.rel_l1 == 0.0 and exact.psnr_db == math.inf and exact.attn_flops == pytest.approx(1.0)
    lossy = runs["all_ast"].table.iloc[1]
    assert lossy.rel_l1 > 0 and lossy.psnr_db < math.inf and lossy.attn_flops < 0.5
    assert any("FID and class accuracy skipped" in note for note in runs["all_ast"].notes)
    with pytest.raises(DifaError, match=r"n must be an integer in \[1, 100000\], got 0"):  # checked before anything runs
        evaluate(model=model, load=lambda: pytest.fail("loaded before the arguments were checked"), plan=ast,
                 **{**SETTINGS, "n": 0})


def test_the_cli_writes_what_evaluate_returns(tmp_path, capsys):
    """The same settings through `python -m difa.evaluate` and through evaluate(): the same rows and images."""
    plan = "diffusers:pab"
    model = plain_config("tiny_dit")
    result = evaluate(model=model, load=lambda: load_pipeline(model), plan=plan, params={"skip": 3}, **SETTINGS)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="evaluate", overrides=[
            "+model=tiny_dit", f"plan={plan}", "skip=3", f"steps={STEPS}", "n=2", "batch=2", "fid=false",
            "warmup=false", "baseline_cache=null", f"out={tmp_path / 'e.csv'}"])
    table, out = evaluate_cli.run(cfg)
    saved, images = pd.read_csv(out), pd.read_csv(tmp_path / "e_images.csv")
    printed = capsys.readouterr().out
    assert all(note in printed for note in result.notes) and f"written to {out}" in printed
    assert list(saved.method) == list(result.table.method) == ["baseline", "diffusers_pab"]
    assert list(saved.plan) == [plan, plan] and saved.steps.tolist() == [STEPS, STEPS]
    same = ["rel_l1", "psnr_db", "ssim", "attn_flops", "macs"]  # deterministic (latency and memory are not)
    pd.testing.assert_frame_equal(saved[same], result.record[same].reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(images, result.images, check_dtype=False)
    assert result.table.rel_l1.iloc[1] > 0 and table.rel_l1.iloc[1] == result.table.rel_l1.iloc[1]


def test_a_text_model_is_evaluated_on_the_users_prompts(tmp_path, capsys, monkeypatch):
    """prompts=<file> (or inputs=[...]) reach the pipeline, cycled to n images, in order; class accuracy is
    skipped (prompts carry no label); without them the default captions are used."""
    from difa import evaluation

    seen = []
    real = evaluation.call

    def spy(pipe, adapter, inputs, **kw):
        seen.extend(inputs)
        return real(pipe, adapter, inputs, **kw)

    monkeypatch.setattr(evaluation, "call", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bird on a branch\n\n  a blue car at night  \n")
    cfg = compose_config(["+model=tiny_pixart", "plan=none", "n=3", "batch=3", f"steps={STEPS}", "fid=false",
                          "warmup=false", "baseline_cache=null", f"prompts={prompts}", f"out={tmp_path / 'e.csv'}"])
    table, out = evaluate_cli.run(cfg)
    # the generated batch (then a MACs-counting call on the first prompt)
    assert seen[:3] == ["a red bird on a branch", "a blue car at night", "a red bird on a branch"], seen
    assert set(seen) == {"a red bird on a branch", "a blue car at night"}
    printed = capsys.readouterr().out
    assert "the 2 given prompts, cycled to 3 images" in printed
    assert len(pd.read_csv(tmp_path / "e_images.csv")) == 3
    seen.clear()
    evaluate_cli.run(compose_config(["+model=tiny_pixart", "plan=none", "n=2", "batch=2", f"steps={STEPS}",
                                     "fid=false", "warmup=false", "baseline_cache=null", f"out={tmp_path / 'f.csv'}"]))
    assert seen and not set(seen) & {"a red bird on a branch", "a blue car at night"}


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="evaluate", overrides=overrides)
