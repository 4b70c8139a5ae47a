"""The Hydra CLIs, composed in-process (as lightning-hydra-template tests do) and, for the error paths a
user meets first, run as real subprocesses."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from difa.cli import calibrate as calibrate_cli
from difa.cli import generate as generate_cli
from difa.cli.common import CONF_DIR, REPO_ROOT
from difa.errors import DifaError
from difa.models import build_tiny_pipeline
from difa.plan import load_plan


def config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("model", ["tiny_dit", "tiny_pixart", "tiny_sd"])
def test_calibrate_then_generate(tmp_path, model, capsys):
    plan_path = tmp_path / "plan.json"
    cfg = config("calibrate", [f"+model={model}", "threshold=0.05", "steps=5", f"out={plan_path}"])
    plan, path = calibrate_cli.run(cfg)
    assert path == plan_path and load_plan(path) == plan
    printed = capsys.readouterr().out
    assert "attention FLOPs" in printed and "model forwards" in printed and str(plan_path) in printed
    assert plan_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # the plan heatmap next to the plan
    cfg = config("generate", [f"plan={plan_path}", "n=2", f"out={tmp_path / 'img'}"])
    images, out = generate_cli.run(cfg)
    assert len(images) == 2 and (out / "000.png").is_file() and (out / "grid.png").is_file()


def test_bare_calibrate_runs_the_bundled_default(tmp_path, capsys):
    cfg = config("calibrate", [f"out={tmp_path / 'p.json'}", "steps=4", "n_calib=2"])
    plan, _ = calibrate_cli.run(cfg)
    assert plan.model.name == "fmnist_dit" and plan.calibration["model_config"]["path"] == "data/models/fmnist-dit"


def test_real_loading_path_with_a_local_save_pretrained_dir(tmp_path):
    """`+model=pixart threshold=0.0725` is the user's command; model.path points it at a local directory."""
    local = tmp_path / "pixart"
    build_tiny_pipeline("pixart", seed=0, sample_size=16).save_pretrained(local)
    cfg = config("calibrate", ["+model=pixart", "threshold=0.0725", f"model.path={local}", "steps=4", "n_calib=2",
                               f"out={tmp_path / 'p.json'}"])
    plan, _ = calibrate_cli.run(cfg)
    assert plan.model.cls == "PixArtTransformer2DModel" and plan.model.name == "pixart" and plan.inference_steps == 4


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_user_errors_are_one_line(tmp_path):
    r = cli("difa.calibrate", "model=pixart")
    assert r.returncode == 2 and "+model=pixart" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # The exact user command is accepted by Hydra; offline, loading the hub id fails with a one-line hint.
    r = cli("difa.calibrate", "+model=pixart", "threshold=0.0725", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # diffusers logs its own offline warnings before it
    assert last.startswith("difa: error: could not load") and "model.path=<local dir>" in last
    assert "Traceback" not in r.stderr
    r = cli("difa.calibrate", "+model=tiny_dit", "threshold=-1", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip() == (
        "difa: error: threshold must be a number >= 0 (got -1); try threshold=0.05")


def test_budget_mode_from_the_cli(tmp_path, capsys):
    """`python -m difa.calibrate budget=...`: a block plan, its predicted latency and checked error printed, the
    block rows in the plan map, and generate runs it."""
    plan_path = tmp_path / "plan.json"
    cfg = config("calibrate", ["+model=tiny_dit", "budget=0.95", "steps=5", f"out={plan_path}"])
    plan, _ = calibrate_cli.run(cfg)
    printed = capsys.readouterr().out
    assert plan.calibration["budget"] == 0.95 and plan.latency["predicted_fraction"] <= 0.95 + 5e-5
    assert "of full predicted" in printed and "checked" in printed and "blocks     " in printed
    assert any(line.rstrip().endswith("transformer_blocks.1") for line in printed.splitlines())
    images, _ = generate_cli.run(config("generate", [f"plan={plan_path}", "n=2", f"out={tmp_path / 'img'}"]))
    assert len(images) == 2


@pytest.mark.parametrize("arg,message", [
    ("budget=0", "budget must be a fraction of the full latency in (0, 1], got 0"),
    ("budget=nan", "budget must be a fraction of the full latency in (0, 1], got nan"),
    ("budget=half", "budget must be a fraction of the full latency in (0, 1], got 'half'"),
    ("latency_batch=0", "latency_batch must be an integer in [1, 4096], got 0"),
    ("search=anneal", "unknown search 'anneal'"),
])
def test_bad_search_settings_are_one_line_errors(tmp_path, arg, message):
    r = cli("difa.calibrate", "+model=tiny_dit", "steps=3", arg, f"hydra.run.dir={tmp_path}", f"out={tmp_path / 'p.json'}")
    assert r.returncode == 2 and r.stderr.strip().startswith(f"difa: error: {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()


def test_generate_transfers_a_plan_to_another_step_count_and_refuses_stray_keys(tmp_path, caplog):
    plan_path = tmp_path / "plan.json"
    calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "budget=0.95", "steps=5", f"out={plan_path}"]))
    with caplog.at_level("WARNING", logger="difa"):
        images, _ = generate_cli.run(config("generate", [f"plan={plan_path}", "steps=9", "n=1", f"out={tmp_path}"]))
    assert len(images) == 1 and "calibrated at 5 steps and runs at 9" in caplog.text
    with pytest.raises(DifaError, match="ratio do not apply to a plan file"):
        generate_cli.run(config("generate", [f"plan={plan_path}", "ratio=0.5", f"out={tmp_path}"]))


@pytest.mark.parametrize("model,preset,extra,expect", [
    ("tiny_sd", "tomesd", ["ratio=0.5"], {"tome"}),
    ("tiny_dit", "agentsd", [], {"agent", "tome"}),
    ("tiny_pixart", "tgate", ["gate_step=3", "sp_interval=2", "warm_up=1"], {"tgate", "ast", "full"}),
    ("tiny_sd", "deepcache", ["cache_interval=2"], {"deepcache", "full"}),
    ("tiny_sd", "tgate+deepcache", ["gate_step=3", "warm_up=1", "cache_interval=2"], {"tgate", "ast", "deepcache", "full"}),
])
def test_generate_runs_presets_and_saves_their_plan(tmp_path, model, preset, extra, expect):
    saved = tmp_path / "preset.json"
    cfg = config("generate", [f"+model={model}", f"plan=preset:{preset}", *extra, "n=2", "steps=5",
                              f"save_plan={saved}", f"out={tmp_path / 'img'}"])
    images, _ = generate_cli.run(cfg)
    plan = load_plan(saved)  # an ordinary plan: saved and loaded the same way
    used = set(plan.counts()) | set(plan.block_counts())
    assert len(images) == 2 and used - {"full"} <= expect and used & (expect - {"full"})
    assert plan.calibration["preset"] == preset


def test_preset_errors_are_one_line(tmp_path):
    from difa.errors import DifaError

    with pytest.raises(DifaError, match="unknown preset 'fast'"):
        generate_cli.run(config("generate", ["+model=tiny_dit", "plan=preset:fast", "n=1", f"out={tmp_path}"]))
    with pytest.raises(DifaError, match="does not take gate_step"):
        generate_cli.run(config("generate", ["+model=tiny_dit", "plan=preset:tomesd", "gate_step=3", "n=1",
                                             f"out={tmp_path}"]))
    with pytest.raises(DifaError, match="has none"):
        generate_cli.run(config("generate", ["+model=tiny_dit", "plan=preset:tgate", "n=1", f"out={tmp_path}"]))


def test_ditfastattn_preset_is_calibration(tmp_path):
    cfg = config("generate", ["+model=tiny_dit", "plan=preset:ditfastattn", "threshold=0.05", "n=2", "steps=4",
                              f"save_plan={tmp_path / 'p.json'}", f"out={tmp_path / 'img'}"])
    generate_cli.run(cfg)
    plan = load_plan(tmp_path / "p.json")
    assert plan.calibration["threshold"] == 0.05 and set(plan.calibration["candidates"]) == {"ast", "wars", "asc", "wars+asc"}
    assert plan.techniques["wars"]["residual_from"] == "full+asc"  # DiTFastAttn's residual rule (DESIGN.md §7)


def test_generate_with_a_diffusers_hook(tmp_path):
    import numpy as np

    def run(*extra):
        images, _ = generate_cli.run(config("generate", ["+model=tiny_pixart", *extra, "n=1", "steps=5",
                                                         f"out={tmp_path / str(len(extra))}"]))
        return np.asarray(images[0], dtype=np.int16)

    base = run("plan=none")
    assert np.array_equal(run("plan=diffusers:pab", "skip=1"), base)  # recompute every step: the stock model
    assert not np.array_equal(run("plan=diffusers:pab", "skip=2", "cross_skip=2", "timestep_range=[0,1000]"), base)
    if importlib.util.find_spec("cache_dit") is not None:  # the peers extra
        assert np.array_equal(run("plan=cachedit:dbcache", "fn_blocks=1", "threshold=0"), base)  # never caches
        assert not np.array_equal(run("plan=cachedit:dbcache", "fn_blocks=1", "warmup_steps=1", "threshold=10"), base)
        with pytest.raises(DifaError, match="skip do not apply to cachedit:dbcache"):
            run("plan=cachedit:dbcache", "skip=2")


def test_technique_parameters_in_the_documented_form(tmp_path):
    """README's `'techniques={tome: {ratio: 0.3}}'` merges into the defaults table (it was "not in struct"); the plan
    records only what differs from the defaults; unknown names and keys are refused by Hydra."""
    from hydra.errors import ConfigCompositionException

    cfg = config("calibrate", ["+model=tiny_dit", "techniques={tome: {ratio: 0.3}, wars: {residual_from: full+asc}}",
                               "search=greedy", "candidates=[wars,tome]", "threshold=0.05", "steps=3",
                               f"out={tmp_path / 'p.json'}"])
    assert cfg.techniques.tome.ratio == 0.3 and cfg.techniques.tome.sx == 2 and cfg.techniques.agent.ratio == 0.4
    plan, _ = calibrate_cli.run(cfg)
    assert plan.techniques["tome"] == {"ratio": 0.3}
    assert plan.techniques["wars"] == {"window": 0.125, "residual_from": "full+asc"}
    for bad in ("techniques={tome: {ratioo: 0.3}}", "techniques={tomme: {ratio: 0.3}}", "techniques.wars.windw=2"):
        with pytest.raises(ConfigCompositionException):
            config("calibrate", ["+model=tiny_dit", bad])


@pytest.mark.parametrize("arg,message", [
    ("techniques.wars.window=0", "techniques.wars.window=0 is invalid"),
    ("techniques.tome.ratio=1.5", "tome ratio must be in [0, 1), got 1.5"),
    ("techniques.wars.residual_from=asc", "wars residual_from 'asc' is unknown"),
])
def test_bad_technique_parameters_fail_before_the_model_loads(tmp_path, arg, message, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the parameters were checked")

    monkeypatch.setattr(calibrate_cli, "load_model", no_load)
    with pytest.raises(DifaError, match=re.escape(message)):
        calibrate_cli.run(config("calibrate", ["+model=tiny_dit", arg, f"out={tmp_path / 'p.json'}"]))


@pytest.mark.parametrize("app,arg,message", [
    ("calibrate", "threshold=nan", "threshold must be a finite number, got nan"),
    ("calibrate", "guidance_scale=nan", "guidance_scale must be a finite number, got nan"),
    ("calibrate", "guidance_scale=abc", "guidance_scale must be a finite number, got 'abc'"),
    ("calibrate", "steps=2.5", "steps must be an integer in [1, 10000], got 2.5"),
    ("calibrate", "steps=abc", "steps must be an integer in [1, 10000], got 'abc'"),
    ("calibrate", "seed=abc", "seed must be an integer in [0, 9223372036854775807], got 'abc'"),
    ("calibrate", "n_calib=abc", "n_calib must be an integer in [1, 100000], got 'abc'"),
    ("calibrate", "device=foo", "unknown device 'foo'"),
    ("generate", "steps=0", "steps must be an integer in [1, 10000], got 0"),
    ("evaluate", "seed=-1", "seed must be an integer in [0, 9223372036854775807], got -1"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, app, arg, message, monkeypatch):
    """Issue 15's inputs: one-line errors, no model forward (load_model is never reached)."""
    from difa.cli import evaluate as evaluate_cli

    module = {"calibrate": calibrate_cli, "generate": generate_cli, "evaluate": evaluate_cli}[app]

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(module, "load_model", no_load)
    extra = [] if app == "calibrate" else ["plan=none"]
    with pytest.raises(DifaError, match=re.escape(message)):
        module.run(config(app, ["+model=tiny_dit", arg, *extra, f"out={tmp_path / 'o'}"]))


def test_cuda_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("difa.calibrate", "+model=tiny_dit", "device=cuda", f"hydra.run.dir={tmp_path}", f"out={tmp_path / 'p.json'}")
    assert r.returncode == 2 and r.stderr.strip().startswith("difa: error: device=cuda but this machine has no CUDA")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()


def test_calibrate_checks_out_before_loading_and_writes_the_heatmap_first(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before out= was checked")

    with monkeypatch.context() as mp:
        mp.setattr(calibrate_cli, "load_model", no_load)
        with pytest.raises(DifaError, match="is a directory"):
            calibrate_cli.run(config("calibrate", ["+model=tiny_dit", f"out={tmp_path}"]))
        with pytest.raises(DifaError, match="is not a regular file"):
            calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "out=/dev/null"]))
    order = []
    from difa import files

    real = files.write_atomic

    def spy(path, *a, **k):
        order.append(str(path).rsplit(".", 1)[-1])
        return real(path, *a, **k)

    monkeypatch.setattr(files, "write_atomic", spy)
    calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "steps=3", f"out={tmp_path / 'p.json'}"]))
    assert order == ["png", "json"] and not list(tmp_path.glob(".*.lock"))


def test_ctrl_c_is_one_line_and_leaves_no_plan(tmp_path):
    import signal
    import time

    out = tmp_path / "p.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 40 steps and no shared latency cache: the greedy runs for seconds even on a loaded machine (with 20 steps and a
    # warm cache it once finished before a starved test process saw its lock)
    # (SIGINT as a terminal delivers it: a suite started in the background (`cmd &`) runs with SIGINT ignored, which
    # its children inherit, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-m", "difa.calibrate", "+model=tiny_dit", "search=greedy", "steps=40",
                             f"out={out}", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lock = tmp_path / ".p.json.lock"
    deadline = time.time() + 120
    while not lock.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the lock exists once the CLI is inside its error handling
    assert proc.poll() is None, "the calibration ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("difa: interrupted"), (out_text, err)
    assert "Traceback" not in err and not out.exists() and not lock.exists()


def test_a_killed_greedy_calibration_resumes_to_the_same_plan(tmp_path):
    """Issue 15: kill -9 a calibration in a subprocess once a few steps are checkpointed; the same command then
    replays them and gives the plan an uninterrupted run gives."""
    import json
    import signal
    import time

    args = ["+model=tiny_dit", "search=greedy", "threshold=0.1", "steps=12", "n_calib=2"]
    straight, _ = calibrate_cli.run(config("calibrate", [*args, f"out={tmp_path / 'a.json'}"]))
    assert not (tmp_path / ".a.json.calib.json").exists()  # removed once the plan is saved
    out, ckpt = tmp_path / "b.json", tmp_path / ".b.json.calib.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "difa.calibrate", *args, f"out={out}", f"hydra.run.dir={tmp_path}"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if len(json.loads(ckpt.read_text())["steps"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(json.loads(ckpt.read_text())["steps"]) >= 3
    resumed, _ = calibrate_cli.run(config("calibrate", [*args, f"out={out}"]))
    assert resumed.calibration["resumed_steps"] >= 3 and resumed.methods == straight.methods
    assert resumed.calibration["forwards"] < straight.calibration["forwards"]  # replayed steps run no trials
    assert resumed.calibration["decisions"] == straight.calibration["decisions"]
    assert not ckpt.exists()


def test_misspelled_keys_are_refused(tmp_path):
    r = cli("difa.calibrate", "+model=tiny_dit", "+threshhold=0.9", f"hydra.run.dir={tmp_path}",
            f"out={tmp_path / 'p.json'}")
    assert r.returncode == 2 and r.stderr.strip().startswith("difa: error: unknown key(s) threshhold for difa.calibrate")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()
    cfg = config("generate", ["plan=none", "+tag=kept", "n=1", f"out={tmp_path / 'img'}"])  # a sweep label is fine
    images, _ = generate_cli.run(cfg)
    assert len(images) == 1


def test_every_key_the_sweeps_pass_is_accepted():
    """The experiment scripts' `+key=` labels and plain keys must pass check_known_keys (a label missing from
    LABEL_KEYS once stopped a whole sweep part)."""
    from omegaconf import OmegaConf

    from difa.cli.common import check_known_keys

    for script in ("experiments/sweeps.sh", "experiments/transfer.sh"):
        for line in (REPO_ROOT / script).read_text().replace("\\\n", " ").splitlines():
            hit = re.search(r"python -m difa\.(calibrate|evaluate)\b(.*)", line)
            if not hit:
                continue
            keys = {k for k in re.findall(r"(?:^|\s|')\+?\+?([a-z_]+)[=.]", hit.group(2)) if k not in ("hydra",)}
            check_known_keys(OmegaConf.create({k: 1 for k in keys}), hit.group(1))  # raises on an unknown key


@pytest.mark.parametrize("inputs", ["[5000]", "[-1]", "[cat]"])
def test_class_ids_out_of_range_are_one_line(tmp_path, inputs):
    """Issue 15: `generate inputs=[5000]` on a class-conditional model (the label embedding has 1000 classes)."""
    with pytest.raises(DifaError, match=r"class ids must be integers in \[0, 1000\) for this model"):
        generate_cli.run(config("generate", ["+model=tiny_dit", "plan=none", f"inputs={inputs}", "n=1",
                                             f"out={tmp_path / 'img'}"]))
    assert not (tmp_path / "img").exists()


def test_a_plan_does_not_choose_what_gets_loaded(tmp_path, caplog):
    """Without +model, generate loads the known config of the model the plan names, never a folder or size the
    plan records (a resolution of 65536 once tried to allocate gigabytes)."""
    import json

    plan_path = tmp_path / "plan.json"
    calibrate_cli.run(config("calibrate", ["+model=tiny_dit", "threshold=0.05", "steps=4", f"out={plan_path}"]))
    d = json.loads(plan_path.read_text())
    d["calibration"]["model_config"].update(path=str(tmp_path / "someone-elses-weights"), resolution=65536)
    plan_path.write_text(json.dumps(d))
    with caplog.at_level("WARNING", logger="difa"):
        images, _ = generate_cli.run(config("generate", [f"plan={plan_path}", "n=1", f"out={tmp_path / 'img'}"]))
    assert images[0].size == (128, 128)  # tiny_dit's own resolution
    assert "loading the known config tiny_dit instead" in caplog.text and "model.resolution=65536" in caplog.text
    d["model"]["name"] = "mystery"
    plan_path.write_text(json.dumps(d))
    with pytest.raises(DifaError, match="names model 'mystery', which has no model config here; .*\\+model=<name>"):
        generate_cli.run(config("generate", [f"plan={plan_path}", "n=1", f"out={tmp_path / 'img'}"]))


def test_the_difa_console_script_runs_the_same_commands(tmp_path, capsys):
    import sys

    from difa.cli.main import main

    assert main(["--help"]) == 0 and "difa {calibrate,generate,evaluate}" in capsys.readouterr().out
    assert main(["calibrat"]) == 2 and "unknown command 'calibrat'" in capsys.readouterr().err
    argv = list(sys.argv)
    assert main(["generate", "+model=tiny_dit", "plan=none", "n=1", "steps=2", f"out={tmp_path / 'img'}",
                 f"hydra.run.dir={tmp_path}"]) == 0
    assert sys.argv == argv and (tmp_path / "img" / "grid.png").is_file()
    assert "(tiny_dit, 2 steps" in capsys.readouterr().out


def test_a_missing_extra_is_named_in_one_line():
    from difa.errors import DifaError, need

    need("eval", ("json",), "x")  # present: nothing to say
    with pytest.raises(DifaError) as e:
        need("eval", ("json", "difa_no_such_module_x"), "difa evaluate")
    assert str(e.value) == ("difa evaluate needs difa_no_such_module_x, which the core install leaves out: "
                            "pip install 'difa[eval]'")
