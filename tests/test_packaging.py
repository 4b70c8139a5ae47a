"""Issue 15: difa works as an installed package, and its library code leaves process-wide state alone.

The wheel test builds an sdist from the checkout's files, builds a wheel from that sdist, and installs it with
`pip install --no-deps --target`. It then runs the two user commands on the bundled default model from an
unrelated directory. The test venv provides the dependencies; the wheel provides difa, its Hydra configs and
the bundled models.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def checkout_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the checkout: what a release is built from."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout to list the files a release is built from")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """sdist from a copy of the checkout's files, then a wheel from the sdist (no downloads, no build isolation)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available in this environment")
    tmp = tmp_path_factory.mktemp("release")
    src = tmp / "src"
    for f in checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = tmp / "dist" / run([sys.executable, "-c", code, str(tmp / "dist")], cwd=src).stdout.strip().splitlines()[-1]
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheels"),
         str(sdist)], cwd=tmp)
    (whl,) = (tmp / "wheels").glob("difa-*.whl")
    return whl


def test_wheel_holds_every_package_the_configs_and_the_bundled_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "difa").rglob("__init__.py")}
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packages <= shipped, f"add {sorted(packages - shipped)} to [tool.setuptools] packages in pyproject.toml"
    confs = {"difa/conf/" + str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}  # conf/ ->
    assert confs and confs <= names and "difa/conf/hydra/launcher/local.yaml" in names
    data = {"difa/bundled/" + str(p.relative_to(REPO / "data")) for p in (REPO / "data").rglob("*") if p.is_file()}
    assert "difa/bundled/models/fmnist-dit/model_index.json" in data and data <= names
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "difa = difa.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()  # the console script


@pytest.mark.slow
def test_installed_wheel_calibrates_and_generates_from_an_unrelated_directory(wheel, tmp_path):
    site, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], cwd=tmp_path)
    env = {**ENV, "PYTHONPATH": str(site)}  # the installed copy first; the test venv supplies the dependencies
    where = run([sys.executable, "-c", "import difa, difa.cli.common as c, difa.models as m; "
                 "print(difa.__file__); print(c.CONF_DIR); print(m.bundled_dir())"], cwd=work, env=env)
    for line in where.stdout.split():
        assert Path(line).is_relative_to(site), f"{line} is not the installed copy under {site}"

    r = run([sys.executable, "-m", "difa.calibrate", "steps=4", "n_calib=1"], cwd=work, env=env)
    plan = work / "plans" / "fmnist_dit_d0.05_s4.json"  # the bundled default model, written under the cwd
    assert plan.is_file() and plan.with_suffix(".png").is_file(), r.stdout
    assert "fmnist_dit" in r.stdout

    r = run([sys.executable, "-m", "difa.generate", "plan=plans/fmnist_dit_d0.05_s4.json", "n=2"], cwd=work, env=env)
    out = work / "outputs" / "generate" / "fmnist_dit_d0.05_s4"
    assert (out / "000.png").is_file() and (out / "grid.png").is_file(), r.stdout


def test_loading_the_text_encoder_leaves_hf_hub_offline_unset_and_stays_off_the_network(tmp_path):
    """difa.zoo scopes offline loading to its own from_pretrained calls; the network is blocked to prove it."""
    code = """
import os, socket
def refuse(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
from difa.zoo import load_minilm
tokenizer, encoder = load_minilm()
assert "HF_HUB_OFFLINE" not in os.environ, os.environ["HF_HUB_OFFLINE"]
print("ok", type(encoder).__name__)
"""
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
    r = run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert r.stdout.split()[-2:] == ["ok", "BertModel"]


def test_generate_accepts_model_without_plus_and_leaves_sys_argv_alone(tmp_path):
    code = ("import sys; from difa.cli.generate import main; argv = list(sys.argv); main(); "
            "assert sys.argv == argv, sys.argv; print('argv kept')")
    args = ["model=tiny_dit", "plan=none", "n=1", "steps=2", f"out={tmp_path / 'img'}", f"hydra.run.dir={tmp_path}"]
    r = run([sys.executable, "-c", code, *args], cwd=tmp_path)
    assert "(tiny_dit, 2 steps" in r.stdout and r.stdout.strip().endswith("argv kept")
    assert (tmp_path / "img" / "grid.png").is_file()
