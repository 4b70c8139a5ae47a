"""Plan value: JSON round trip, atomic save, validation errors (one line each), derived cache needs."""

from __future__ import annotations

import json

import pytest

from difa.errors import DifaError
from difa.cells import keeps
from difa.plan import ModelIdentity, Plan, load_plan
from difa.techniques.base import OUT
from difa.techniques.wars import WINDOW_RESIDUAL

IDENTITY = ModelIdentity("DiTTransformer2DModel", "abc123", ("b.0.attn1", "b.1.attn1"), "tiny", "dit")


def make(methods=(("full", "wars", "ast"), ("full", "asc", "wars+asc")), **kw) -> Plan:
    return Plan(model=IDENTITY, scheduler="DDIMScheduler", steps=len(methods[0]), methods=tuple(map(tuple, methods)),
                techniques={"wars": {"window": 0.125}}, calibration={"threshold": 0.05, "decisions": [{"tried": {"ast": 0.1}}]},
                **kw)


def one_line_error(fn, match: str) -> str:
    with pytest.raises(DifaError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_json_round_trip(tmp_path):
    plan = make()
    path = plan.save(tmp_path / "sub" / "p.json")
    back = load_plan(path)
    assert back == plan and back.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["methods"]["b.1.attn1"] == ["full", "asc", "wars+asc"]
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temporary file left behind


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = make().save(tmp_path / "p.json")
    before = path.read_text()
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    from difa.errors import DifaError

    with pytest.raises(DifaError, match="disk full; the previous file, if any, is unchanged"):
        make(methods=(("full", "full", "full"), ("full", "full", "full"))).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a difa plan"),
        ('{"schema": "difa.plan", "version": 99}', "schema version 99"),
        ('{"schema": "difa.plan", "version": 1, "model": {}}', "missing or has a malformed field"),
    ],
)
def test_corrupt_files_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    one_line_error(lambda: load_plan(path), match)


def test_missing_file(tmp_path):
    one_line_error(lambda: load_plan(tmp_path / "nope.json"), "does not exist")


def test_invalid_plans_are_rejected():
    one_line_error(lambda: make(methods=(("full", "fast", "ast"), ("full", "full", "full"))), "unknown method 'fast'")
    one_line_error(lambda: make(methods=(("ast", "full", "ast"), ("full", "full", "full"))), "nothing is cached at step 0")
    one_line_error(lambda: make(cfg_enabled=False), "CFG off")
    one_line_error(lambda: make(methods=(("full", "full"), ("full", "full", "full"))), "has 3 steps, expected 2")
    d = make().to_dict()
    d["methods"].pop("b.0.attn1")
    one_line_error(lambda: Plan.from_dict(d), "one row per layer")


def test_pickle_is_never_read(tmp_path):
    import pickle

    path = tmp_path / "p.json"
    path.write_bytes(pickle.dumps(make().to_dict()))
    one_line_error(lambda: load_plan(path), "not valid JSON|not a difa plan")


def test_cache_needs_are_derived_from_the_plan():
    rows = [["full", "wars", "ast", "full", "asc", "full", "wars+asc"]]
    assert [keeps(r, WINDOW_RESIDUAL, {}) for r in rows] == [[True, False, False, False, False, True, False]]
    assert [keeps(r, OUT, {}) for r in rows] == [[False, True, False, False, False, False, False]]
    assert keeps(["full", "ast", "ast"], WINDOW_RESIDUAL, {}) == [False, False, False]


def _edit(d: dict, path: str, value):
    *head, last = path.split(".")
    for k in head:
        d = d[k]
    d[last] = value


@pytest.mark.parametrize("path, value, match", [
    ("scheduler.steps", "3", r"scheduler.steps must be a positive integer \(got '3'\)"),
    ("scheduler.steps", 3.0, r"scheduler.steps must be a positive integer \(got 3.0\)"),
    ("scheduler.steps", True, "scheduler.steps must be a positive integer"),
    ("scheduler.num_inference_steps", -2, "num_inference_steps must be a positive integer"),
    ("cfg.enabled", "false", "'enabled' must be bool, got str"),  # bool("false") was True
    ("cfg.guidance_scale", "4", "guidance_scale must be a finite number"),
    ("techniques", [1], "'techniques' must be Mapping, got list"),
    ("techniques", {"wars": [1]}, "must map technique names to parameter tables"),
    ("techniques", {"wars": {"window": 0}}, r"techniques.wars.window=0 is invalid"),  # was found mid-generation
    ("techniques", {"wars": {"window": "abc"}}, r"techniques.wars.window must be a number, got 'abc'"),
    ("techniques", {"wars": {"widow": 4}}, r"unknown parameter\(s\) \['widow'\]"),
    ("methods.b.0.attn1", [1, 2, 3], "must be a list of method names"),
    ("model.layers", "b.0.attn1", "model.layers must be a list of module names"),
    ("calibration", [], "'calibration' must be Mapping"),
])
def test_every_plan_field_is_type_checked(tmp_path, path, value, match):
    d = make().to_dict()
    if path.startswith("methods."):
        d["methods"][path[len("methods."):]] = value
    else:
        _edit(d, path, value)
    file = tmp_path / "p.json"
    file.write_text(json.dumps(d))
    one_line_error(lambda: load_plan(file), match)


def test_huge_numbers_deep_nesting_and_big_files_are_refused_unparsed(tmp_path, monkeypatch):
    import difa.plan as plan_mod

    file = tmp_path / "p.json"
    file.write_text(make().to_json().replace('"steps": 3', '"steps": 1e400'))
    one_line_error(lambda: load_plan(file), r"scheduler.steps must be a positive integer \(got inf\)")
    file.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    one_line_error(lambda: load_plan(file), "nested too deeply")
    file.write_text(make().to_json())
    monkeypatch.setattr(plan_mod, "MAX_PLAN_BYTES", 100)  # a real plan of 3 steps is over 100 bytes
    read = []
    monkeypatch.setattr(plan_mod.Path, "read_bytes", lambda self: read.append(self))
    one_line_error(lambda: load_plan(file), "over the 0 MB a plan can be")
    assert read == []  # refused before reading
