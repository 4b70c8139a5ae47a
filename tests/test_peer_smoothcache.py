"""SmoothCache as a peer (`plan=smoothcache:<schedule.json>|calibrate`): the runtime is the real package's
SmoothCacheHelper, so through difa it equals using that helper directly with the same schedule; the schedule rule
(the wheel has no calibration helper, difa carries it) against a hand-worked example and a naive scan."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from difa.errors import DifaError
from difa.peers import SMOOTHCACHE_COMPONENTS, SmoothCache, hook_from_spec, smoothcache_schedule
from tests.conftest import generate, tiny

helper_mod = pytest.importorskip("SmoothCache.smooth_cache_helper")
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8


def test_schedule_rule_on_a_hand_worked_example():
    # rows[j][i]: error of serving step i's output at step i + j + 1 (3 lookahead rows over 8 steps)
    rows = [[0.1, 0.5, 0.1, 0.1, 0.1, 0.1, 0.5],
            [0.3, 0.5, 0.2, 0.5, 0.3, 0.5],
            [0.5, 0.5, 0.5, 0.25, 0.5]]
    # i=0: only row 0 <= 0.2 -> compute 0, reuse at 1; i=2: row 1 -> compute 2, reuse 3, 4; i=5: row 0 -> reuse 6;
    # i=7: last step, computed
    assert smoothcache_schedule(rows, 8, 0.2) == [1, 0, 1, 0, 0, 1, 0, 1]
    assert smoothcache_schedule(rows, 8, 0.0) == [1] * 8  # nothing below 0
    assert smoothcache_schedule(rows, 8, 1.0) == [1, 0, 0, 0, 1, 0, 0, 1]  # the longest reuse everywhere; last on


def test_schedule_rule_against_a_naive_scan():
    """The same rule spelled as a per-step loop over the priorities, on random errors."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n, length, thr = 1 + trial % 4, 5 + trial % 9, 0.3
        rows = [torch.rand(length - j - 1, generator=g).tolist() for j in range(n)]
        want, i = [None] * length, 0
        while i < length:
            for j in range(n - 1, -1, -1):
                if i < len(rows[j]) and rows[j][i] <= thr:
                    want[i] = 1
                    for k in range(1, j + 2):
                        if i + k < length:
                            want[i + k] = 0
                    i += j + 2
                    break
            else:
                want[i] = 1
                i += 1
        want[0] = want[-1] = 1
        assert smoothcache_schedule(rows, length, thr) == want


def directly(pipe, family, schedule):
    """SmoothCache's helper used as its README shows, one fresh enable() per generation (it never resets)."""
    from diffusers.models.attention import BasicTransformerBlock

    helper = helper_mod.SmoothCacheHelper(pipe.transformer, BasicTransformerBlock, list(schedule), schedule)
    helper.enable()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return generate(pipe, family, steps=STEPS)
    finally:
        helper.disable()


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_calibrated_schedule_through_difa_equals_the_helper_directly(family, tmp_path):
    pipe = tiny(family)
    base = generate(pipe, family, steps=STEPS)
    peer = hook_from_spec("smoothcache:calibrate", {"threshold": 0.5, "lookahead": 2})
    peer.prepare(pipe, STEPS, lambda: generate(pipe, family, steps=STEPS))
    assert set(peer.schedule) <= set(SMOOTHCACHE_COMPONENTS) and "attn1" in peer.schedule
    assert all(len(v) == STEPS and v[0] == v[-1] == 1 for v in peer.schedule.values())
    assert any(0 in v for v in peer.schedule.values()) and peer.calibration["forwards"] == STEPS
    peer.apply(pipe)
    peer.apply(pipe)  # twice is safe
    try:
        got, again = generate(pipe, family, steps=STEPS), generate(pipe, family, steps=STEPS)  # reset per generation
    finally:
        peer.remove(pipe)
    assert torch.equal(generate(pipe, family, steps=STEPS), base)  # removed: the stock model again
    assert torch.equal(got, again) and not torch.equal(got, base)
    assert torch.equal(got, directly(pipe, family, peer.schedule))
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(peer.schedule))
    from_file = SmoothCache(str(path))
    from_file.apply(pipe)
    try:
        assert torch.equal(generate(pipe, family, steps=STEPS), got)
    finally:
        from_file.remove(pipe)
    assert "print" not in vars(helper_mod)  # its silenced print restored


@pytest.mark.parametrize("spec, params, message", [
    ("missing.json", {}, "cannot read the SmoothCache schedule"),
    ("calibrate", {"lookahead": 0}, "lookahead must be an integer >= 1"),
    ("calibrate", {"skip": 2}, "drop skip"),
])
def test_bad_smoothcache_inputs(spec, params, message):
    with pytest.raises(DifaError, match=message):
        SmoothCache(spec, params)


def test_malformed_schedule_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"attn1": [1, 2]}))
    with pytest.raises(DifaError, match="lists of 0/1 per step"):
        SmoothCache(str(bad))
    with pytest.raises(DifaError, match="schedule first"):
        SmoothCache("calibrate").apply(tiny("dit"))
    cross = tmp_path / "cross.json"
    cross.write_text(json.dumps({"attn2": [1, 0, 1]}))
    with pytest.raises(DifaError, match="names attn2, which DiTTransformer2DModel's blocks lack"):
        SmoothCache(str(cross)).apply(tiny("dit"))
