"""The hostile-input audit as tests: one table of bad inputs per command, each run through the command's real entry
point (`main()`, Hydra included) in a folder of planted files. Every case must exit 2 with one line on stderr, no
traceback, nothing changed on disk, and (unless the case needs the model: class ids against its class count)
before the model loads. Then the Python API's table: each public function refuses the same values in one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from difa.cli import calibrate as calibrate_cli
from difa.cli import evaluate as evaluate_cli
from difa.cli import generate as generate_cli
from difa.errors import DifaError
from tests.conftest import GUIDANCE, STEPS, tiny

LONG = "x" * 300
NEEDS_MODEL = "model"  # the case's refusal needs the loaded model (its class count), so the load is allowed

CALIBRATE = [  # +model=tiny_dit steps=3 n_calib=2 out=p.json, plus:
    (["techniques.tome.ratio=abc"], "techniques.tome.ratio must be a number"),
    (["techniques.tome.ratio=5"], "tome ratio must be in [0, 1)"),
    (["techniques.wars.window=-1"], "techniques.wars.window=-1 is invalid"),
    (["techniques.foo.x=1"], "bad override for difa.calibrate: Could not override 'techniques.foo.x'"),
    (["threshold=["], "bad override for difa.calibrate: no viable alternative"),
    (["+model=nope"], "Could not find 'model/nope'"),
    (["seed=99999999999999999999999"], "seed must be an integer in [0, 9223372036854775807]"),
    (["seed=-1"], "seed must be an integer in [0,"),
    ([f"out={LONG}.json"], "has a 305-byte name"),
    (["steps=1000000000000"], "steps must be an integer in [1, 10000]"),
    (["steps=abc"], "steps must be an integer in [1, 10000], got 'abc'"),
    (["n_calib=1000000000000"], "n_calib must be an integer in [1, 100000]"),
    (["n_calib=0"], "n_calib must be an integer in [1, 100000], got 0"),
    (["latency_batch=1000000000000"], "latency_batch must be an integer in [1, 4096]"),
    (["latency_batch=0"], "latency_batch must be an integer in [1, 4096], got 0"),
    (["search=greedy", "candidates=[reuse]"], "search=greedy plans attention cells, and candidates ['reuse'] has none"),
    (["candidates=[foo]"], "unknown candidate method(s) 'foo'"),
    (["candidates=[]"], "search=trajectory plans block cells"),
    (["threshold=-1"], "threshold must be a number >= 0"),
    (["threshold=abc"], "threshold must be a finite number, got 'abc'"),
    (["window=0"], "window=0 is invalid"),
    (["window=abc"], "window='abc' is invalid"),
    (["search=foo"], "unknown search 'foo'"),
    (["search=greedy", "budget=0.5"], "budget mode needs search=trajectory"),
    (["dtype=int8"], "unknown dtype 'int8'"),
    (["budget=2"], "budget must be a fraction of the full latency in (0, 1], got 2"),
    (["budget=abc"], "budget must be a fraction"),
    (["budget=[]"], "budgets must be a non-empty list"),
    (["max_cache_mb=-1"], "max_cache_mb must be a finite number in [0, inf], got -1"),
    (["loss_on=foo"], "unknown loss_on 'foo'"),
    (["guidance_scale=nan"], "guidance_scale must be a finite number, got nan"),
    (["device=tpu"], "unknown device 'tpu'"),
    (["out=adir"], "out='adir' is a directory"),
    (["out=fifo"], "out='fifo' is not a regular file"),
    (["out=x.png"], "would be overwritten by its own heatmap"),
    (["+threshhold=0.1"], "unknown key(s) threshhold"),
    (["model.path=/nonexistent"], "needs exactly one of model.path"),
    (["model.inputs=5"], "inputs must be a non-empty list of class ids or prompts, got 5"),
    (["model.inputs=[1,a]"], "inputs mix class ids and prompts"),
    (["model.resolution=100000000"], "model.resolution must be an integer in [8, 16384]"),
    (["model.scheduler=NoSuchScheduler"], "diffusers has no scheduler 'NoSuchScheduler'"),
    (["model.inputs=[5000]"], "class ids must be integers in [0, 1000)", NEEDS_MODEL),
]

GENERATE = [  # plan=plan.json n=2 out=img, plus (a case with its own plan= replaces it):
    (["plan=???"], "difa.generate needs plan=..."),
    (["plan=/nonexistent.json"], "does not exist"),
    (["plan=adir"], "plan='adir' is a folder"),
    (["plan=fifo"], "plan='fifo' is not a regular file"),
    (["plan=bad.json"], "is not valid JSON"),
    (["plan=unknown.json"], "has key(s) this difa does not know: bogus_key, model.extra"),
    (["plan=repeated.json"], "repeats the key 'version'"),
    (["+model=tiny_sd", "plan=preset:tomesd", "ratio=abc"], "tomesd ratio must be a number, got 'abc'"),
    (["+model=tiny_sd", "plan=preset:tomesd", "ratio=5"], "tome ratio must be in [0, 1)"),
    (["+model=tiny_sd", "plan=preset:tgate", "gate_step=0"], "tgate gate_step must be an integer >= 1"),
    (["+model=tiny_sd", "plan=preset:tomesd", "save_plan=adir"], "save_plan='adir' is a directory"),
    (["+model=tiny_dit", "plan=preset:foo"], "unknown preset 'foo'"),
    (["+model=tiny_dit", "plan=preset:ditfastattn", "threshold=-1"], "threshold must be a number >= 0"),
    (["+model=tiny_dit", "plan=diffusers:pab", "timestep_range=5"], "timestep_range must be [low, high]"),
    (["+model=tiny_dit", "plan=diffusers:fbc", "threshold=abc"], "threshold must be a finite number, got 'abc'"),
    (["+model=tiny_dit", "plan=diffusers:foo"], "unknown diffusers hook 'foo'"),
    (["+model=tiny_dit", "plan=diffusers:taylorseer", "order=abc"], "order must be an integer >= 0"),
    (["+model=tiny_dit", "plan=cachedit:dbcache", "fn_blocks=abc"], "fn_blocks must be an integer >= 1"),
    (["+model=tiny_dit", "plan=smoothcache:/nonexistent.json"], "cannot read the SmoothCache schedule"),
    (["inputs=5"], "inputs must be a list, got '5'"),
    (["inputs=[]"], "inputs must be a non-empty list"),
    (["prompts=adir"], "prompts='adir' is not a regular file"),
    (["prompts=fifo"], "prompts='fifo' is not a regular file"),
    (["inputs=[1]", "prompts=prompts.txt"], "give inputs=[...] or prompts=<file>, not both"),
    (["n=1000000000000"], "n must be an integer in [1, 100000]"),
    (["n=0"], "n must be an integer in [1, 100000], got 0"),
    (["seed=99999999999999999999999"], "seed must be an integer in [0, 9223372036854775807]"),
    (["steps=1000000000000"], "steps must be an integer in [1, 10000]"),
    (["out=existing.txt"], "out='existing.txt' is a file, not a folder"),
    (["out=/dev/null"], "out='/dev/null' is a file, not a folder"),
    ([f"out={LONG}"], "has a 300-byte name"),
    (["dtype=int8"], "unknown dtype 'int8'"),
    (["guidance_scale=abc"], "guidance_scale must be a finite number, got 'abc'"),
    (["inputs=[5000]"], "class ids must be integers in [0, 1000)", NEEDS_MODEL),
    (["inputs=[a,b]"], "class ids must be integers in [0, 1000)", NEEDS_MODEL),
]

EVALUATE = [  # +model=tiny_dit plan=none n=2 batch=2 steps=3 fid=false classifier=null baseline_cache=null out=e.csv
    (["warmup=abc"], "warmup must be true or false, got 'abc'"),
    (["fid=maybe"], "fid must be true or false, got 'maybe'"),
    (["warmup=1"], "warmup must be true or false, got 1"),
    (["n=1000000000000"], "n must be an integer in [1, 100000]"),
    (["batch=1000000000000"], "batch must be an integer in [1, 4096]"),
    (["batch=0"], "batch must be an integer in [1, 4096], got 0"),
    (["ref_n=0"], "ref_n must be an integer in [2, 10000], got 0"),
    (["time_batches=-1"], "time_batches must be an integer in [1, 100000], got -1"),
    (["seed=99999999999999999999999"], "seed must be an integer in [0, 9223372036854775807]"),
    (["steps=1000000000000"], "steps must be an integer in [1, 10000]"),
    (["fid_source=foo"], "unknown fid_source 'foo'"),
    (["out=adir"], "out='adir': evaluate writes a CSV table"),
    (["out=adir.csv"], "out='adir.csv' is a directory"),
    (["out=/dev/null"], "evaluate writes a CSV table"),
    ([f"out={LONG}.csv"], "has a 304-byte name"),
    (["out=link.csv"], "a file next to out 'link_images.csv' is a symlink"),
    (["baseline_cache=existing.txt"], "baseline_cache='existing.txt' is not a folder"),
    (["plan=adir"], "plan='adir' is a folder"),
    (["plan=fifo"], "plan='fifo' is not a regular file"),
    (["plan=unknown.json"], "has key(s) this difa does not know"),
    (["plan=preset:tomesd", "ratio=abc"], "tomesd ratio must be a number, got 'abc'"),
    (["plan=diffusers:pab", "timestep_range=5"], "timestep_range must be [low, high]"),
    (["plan=diffusers:fbc", "threshold=abc"], "threshold must be a finite number, got 'abc'"),
    (["inputs=abc"], "inputs must be a list, got 'abc'"),
    (["prompts=missing.txt"], "prompts file 'missing.txt' does not exist"),
    (["prompts=empty.txt"], "has no prompts"),
    (["save_plan=adir", "plan=preset:tomesd"], "save_plan='adir' is a directory"),
    (["inputs=[5000]"], "class ids must be integers in [0, 1000)", NEEDS_MODEL),
    (["prompts=prompts.txt"], "class ids must be integers in [0, 1000) for this model, got 'a red bird'", NEEDS_MODEL),
]

BASE = {
    "calibrate": ["+model=tiny_dit", "steps=3", "n_calib=2", "out=p.json"],
    "generate": ["plan=plan.json", "n=2", "out=img"],
    "evaluate": ["+model=tiny_dit", "plan=none", "n=2", "batch=2", "steps=3", "fid=false", "classifier=null",
                 "baseline_cache=null", "out=e.csv"],
}
CLI = {"calibrate": calibrate_cli, "generate": generate_cli, "evaluate": evaluate_cli}


@pytest.fixture(scope="module")
def shipped_plan(tmp_path_factory) -> dict:
    """A real tiny-DiT plan, as the files planted next to each case are built from it."""
    from difa.calibration import fixed_plan

    pipe = tiny("dit")
    plan = fixed_plan(pipe, lambda i, t: "ast" if t else "full", steps=3, guidance_scale=GUIDANCE["dit"],
                      name="tiny_dit")
    return plan.to_dict()


def plant(folder: Path, plan: dict) -> None:
    """The files a careless user or an attacker leaves around: a folder, a FIFO, a plain file, plans with unknown,
    repeated or broken keys, a prompt file, an empty one, a link where a side file goes."""
    (folder / "adir").mkdir()
    (folder / "adir.csv").mkdir()
    (folder / "existing.txt").write_text("keep")
    os.mkfifo(folder / "fifo")
    (folder / "plan.json").write_text(json.dumps(plan))
    unknown = json.loads(json.dumps(plan))
    unknown["bogus_key"] = 1
    unknown["model"]["extra"] = 2
    (folder / "unknown.json").write_text(json.dumps(unknown))
    (folder / "repeated.json").write_text(json.dumps(plan)[:-1] + ', "version": 3}')
    (folder / "bad.json").write_text("{not json")
    (folder / "prompts.txt").write_text("a red bird\n\na blue car\n")
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "link_images.csv").symlink_to(folder / "existing.txt")


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in folder.rglob("*") if "hydra_run" not in p.parts}


def cases(table: list) -> list:
    return [pytest.param(c[0], c[1], len(c) > 2, id=" ".join(c[0])[:60]) for c in table]


def run_main(app: str, args: list[str], folder: Path, monkeypatch, capsys, allow_load: bool) -> tuple[int, str]:
    monkeypatch.chdir(folder)
    own = {a.split("=", 1)[0].lstrip("+") for a in args}
    argv = [a for a in BASE[app] if a.split("=", 1)[0].lstrip("+") not in own] + args
    argv = [a for a in argv if a != "plan=???"] + [f"hydra.run.dir={folder / 'hydra_run'}"]
    if not allow_load:
        def no_load(*a, **k):
            raise AssertionError("the model was loaded before the bad value was refused")

        monkeypatch.setattr(CLI[app], "load_model", no_load)
    monkeypatch.setattr(sys, "argv", [f"difa.{app}", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        CLI[app].main()
    return e.value.code, capsys.readouterr().err


def check_refusal(app, args, message, needs_model, tmp_path, monkeypatch, capsys, shipped_plan):
    plant(tmp_path, shipped_plan)
    before = snapshot(tmp_path)
    code, err = run_main(app, args, tmp_path, monkeypatch, capsys, needs_model)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("difa: error: ") and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a refused run changed files on disk"


@pytest.mark.parametrize("args,message,needs_model", cases(CALIBRATE))
def test_calibrate_refuses(args, message, needs_model, tmp_path, monkeypatch, capsys, shipped_plan):
    check_refusal("calibrate", args, message, needs_model, tmp_path, monkeypatch, capsys, shipped_plan)


@pytest.mark.parametrize("args,message,needs_model", cases(GENERATE))
def test_generate_refuses(args, message, needs_model, tmp_path, monkeypatch, capsys, shipped_plan):
    check_refusal("generate", args, message, needs_model, tmp_path, monkeypatch, capsys, shipped_plan)


@pytest.mark.parametrize("args,message,needs_model", cases(EVALUATE))
def test_evaluate_refuses(args, message, needs_model, tmp_path, monkeypatch, capsys, shipped_plan):
    check_refusal("evaluate", args, message, needs_model, tmp_path, monkeypatch, capsys, shipped_plan)


def test_a_bad_value_is_refused_before_a_model_that_cannot_load(tmp_path, monkeypatch, capsys):
    """Unpatched loading of a model folder that does not exist would fail loudly (and on a hub model take
    minutes); the bad value's own error comes first, fast."""
    import time

    for app, args, message in [
        ("calibrate", ["+model=fmnist_dit", "model.path=/nonexistent/model", "search=foo"], "unknown search 'foo'"),
        ("generate", ["+model=fmnist_dit", "model.path=/nonexistent/model", "plan=none", "out=existing.txt"],
         "is a file, not a folder"),
        ("evaluate", ["+model=fmnist_dit", "model.path=/nonexistent/model", "fid=maybe"], "fid must be true or false"),
    ]:
        (tmp_path / "existing.txt").write_text("keep")
        t0 = time.perf_counter()
        code, err = run_main(app, args, tmp_path, monkeypatch, capsys, allow_load=True)
        assert code == 2 and message in err and "could not load" not in err, err
        assert time.perf_counter() - t0 < 10


@pytest.fixture(scope="module")
def pipe():
    return tiny("dit")


def api_cases():
    from difa import apply_plan, calibrate_pipeline
    from difa.evaluation import evaluate
    from difa.calibration import fixed_plan, retime_plan
    from difa.peers import hook_from_spec
    from difa.presets import preset_plan

    full = lambda i, t: "full"  # noqa: E731
    fixed = dict(steps=3, guidance_scale=4.0)
    calib = dict(threshold=0.05, steps=3, guidance_scale=4.0, latency_cache=None)
    model = {"name": "tiny_dit", "family": "dit", "tiny": "dit", "path": None, "steps": 3, "guidance_scale": 4.0}
    ev = dict(model=model, n=2, batch=2, fid=False, classifier="none", time_batches=None)
    return [
        ("calibrate threshold nan", lambda p: calibrate_pipeline(p, [1], **{**calib, "threshold": float("nan")}),
         "threshold must be a number >= 0"),
        ("calibrate class 5000", lambda p: calibrate_pipeline(p, [5000], **calib), "class ids must be integers"),
        ("calibrate mixed inputs", lambda p: calibrate_pipeline(p, [1, "a"], **calib), "inputs mix class ids"),
        ("calibrate huge steps", lambda p: calibrate_pipeline(p, [1], **{**calib, "steps": 10**12}),
         "steps must be an integer in"),
        ("calibrate candidates str", lambda p: calibrate_pipeline(p, [1], **calib, candidates="nope"),
         "unknown candidate method(s) 'nope'"),
        ("calibrate greedy blocks", lambda p: calibrate_pipeline(p, [1], **calib, search="greedy",
                                                                 candidates=["reuse"]), "has none"),
        ("calibrate techniques", lambda p: calibrate_pipeline(p, [1], **calib, techniques={"tome": {"ratio": "x"}}),
         "techniques.tome.ratio must be a number"),
        ("apply int", lambda p: apply_plan(p, 5), "apply_plan takes a Plan"),
        ("apply missing file", lambda p: apply_plan(p, "/nonexistent.json"), "does not exist"),
        ("apply collapse_cfg", lambda p: apply_plan(p, fixed_plan(p, full, **fixed), collapse_cfg="no"),
         "collapse_cfg must be true or false"),
        ("fixed huge steps", lambda p: fixed_plan(p, full, steps=10**12, guidance_scale=4.0), "steps must be an integer"),
        ("fixed steps text", lambda p: fixed_plan(p, full, steps="abc", guidance_scale=4.0), "steps must be an integer"),
        ("fixed not callable", lambda p: fixed_plan(p, "ast", **fixed), "must be functions"),
        ("fixed guidance nan", lambda p: fixed_plan(p, full, steps=3, guidance_scale=float("nan")),
         "guidance_scale must be a finite number"),
        ("fixed window 0", lambda p: fixed_plan(p, full, **fixed, window=0), "window=0 is invalid"),
        ("fixed techniques", lambda p: fixed_plan(p, full, **fixed, techniques={"tome": {"ratio": "x"}}),
         "techniques.tome.ratio must be a number"),
        ("fixed kinds", lambda p: fixed_plan(p, full, **fixed, kinds=("foo",)), "unknown layer kind"),
        ("retime huge", lambda p: retime_plan(fixed_plan(p, full, **fixed), p, 10**12), "steps must be an integer"),
        ("preset huge steps", lambda p: preset_plan("tomesd", p, steps=10**12, guidance_scale=4.0),
         "steps must be an integer"),
        ("preset ratio", lambda p: preset_plan("tomesd", p, **fixed, ratio="abc"), "tomesd ratio must be a number"),
        ("preset unknown key", lambda p: preset_plan("tomesd", p, **fixed, gate_step=3), "does not take gate_step"),
        ("peer timestep_range", lambda p: hook_from_spec("diffusers:pab", {"timestep_range": 5}), "timestep_range"),
        ("peer threshold", lambda p: hook_from_spec("diffusers:fbc", {"threshold": "abc"}), "threshold"),
        ("evaluate fid text", lambda p: evaluate(pipe=p, **{**ev, "fid": "false"}), "fid must be true or false"),
        ("evaluate huge n", lambda p: evaluate(pipe=p, **{**ev, "n": 10**12}), "n must be an integer in"),
        ("evaluate seed", lambda p: evaluate(pipe=p, **ev, seed=2**70), "seed must be an integer in"),
        ("evaluate inputs", lambda p: evaluate(pipe=p, **ev, inputs=5), "inputs must be a non-empty list"),
        ("evaluate class 5000", lambda p: evaluate(pipe=p, **ev, inputs=[5000]), "class ids must be integers"),
        ("evaluate preset", lambda p: evaluate(pipe=p, **ev, plan="preset:tomesd", params={"ratio": "x"}),
         "tomesd ratio must be a number"),
    ]


@pytest.mark.parametrize("case", api_cases(), ids=lambda c: c[0])
def test_the_python_api_refuses_in_one_line(case, pipe):
    _, call, message = case
    with pytest.raises(DifaError) as e:
        call(pipe)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_plan_from_another_scheduler_warns(pipe, caplog):
    """A plan's cells are placed by step index: on another sampler they sit at other timesteps. It runs, with a
    warning naming both schedulers."""
    from diffusers import DDIMScheduler

    from difa import apply_plan, remove_plan
    from difa.calibration import fixed_plan

    plan = fixed_plan(pipe, lambda i, t: "ast" if t else "full", steps=STEPS, guidance_scale=GUIDANCE["dit"])
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        with caplog.at_level("WARNING", logger="difa"):
            apply_plan(pipe, plan)
        assert f"calibrated with {plan.scheduler} and this pipeline runs DDIMScheduler" in caplog.text
        remove_plan(pipe)
        caplog.clear()
        pipe.scheduler = original
        with caplog.at_level("WARNING", logger="difa"):
            apply_plan(pipe, plan)
        assert "calibrated with" not in caplog.text
    finally:
        remove_plan(pipe)
        pipe.scheduler = original
