"""difa.peers: diffusers' PAB and FirstBlockCache hooks on the stock pipelines, against naive references written
here (per-module output reuse, and first-block residual caching), plus undo and apply-twice."""

from __future__ import annotations

import pytest
import torch

from difa.errors import DifaError
from difa.peers import DiffusersHook
from tests.conftest import generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 6  # tiny models' timesteps: 999, 833, 666, 500, 333, 167 (DPM-Solver, linspace)


class NaivePAB:
    """PAB's rule, written out: inside (low, high) exclusive, an attention module recomputes on every `skip`-th of
    its calls in the generation (counting from 0) and otherwise returns its previous output."""

    def __init__(self, pipe, kinds, skip, low, high):
        self.pipe, self.skip, self.low, self.high, self.t = pipe, skip, low, high, None
        model = pipe.transformer
        self.handles = [model.register_forward_pre_hook(self.record, with_kwargs=True)]
        self.originals = []
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in kinds:
                self.originals.append((module, module.forward))
                module.forward = self.wrap(module.forward)

    def record(self, module, args, kwargs):
        self.t = float(kwargs["timestep"].flatten()[0])

    def wrap(self, forward):
        state = {"calls": 0, "cache": None}

        def new_forward(*args, **kwargs):
            if state["calls"] == 0 or not self.low < self.t < self.high or state["calls"] % self.skip == 0:
                state["cache"] = forward(*args, **kwargs)
            state["calls"] += 1
            return state["cache"]

        return new_forward

    def remove(self):
        for h in self.handles:
            h.remove()
        for module, forward in self.originals:
            module.forward = forward


def run_naive_pab(family, kinds, skip, low=100, high=800):
    pipe = tiny(family)
    naive = NaivePAB(pipe, kinds, skip, low, high)
    try:
        return generate(pipe, family, steps=STEPS)
    finally:
        naive.remove()


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("skip", [2, 3])
def test_pab_matches_the_naive_rule(family, skip):
    pipe = tiny(family)
    base = generate(pipe, family, steps=STEPS)
    hook = DiffusersHook("pab", {"skip": skip})
    hook.apply(pipe)
    try:
        got = generate(pipe, family, steps=STEPS)
        again = generate(pipe, family, steps=STEPS)  # state is reset per generation
    finally:
        hook.remove(pipe)
    want = run_naive_pab(family, {"attn1"}, skip)
    assert torch.equal(got, want) and torch.equal(again, got)
    assert not torch.equal(got, base)


def test_pab_cross_attention_skip_on_pixart():
    pipe = tiny("pixart")
    hook = DiffusersHook("pab", {"skip": 2, "cross_skip": 3, "timestep_range": (0, 900)})
    hook.apply(pipe)
    try:
        got = generate(pipe, "pixart", steps=STEPS)
    finally:
        hook.remove(pipe)
    self_only = run_naive_pab("pixart", {"attn1"}, 2, 0, 900)
    pipe = tiny("pixart")
    a = NaivePAB(pipe, {"attn1"}, 2, 0, 900)
    b = NaivePAB(pipe, {"attn2"}, 3, 0, 900)
    try:
        want = generate(pipe, "pixart", steps=STEPS)
    finally:
        b.remove()
        a.remove()
    assert torch.equal(got, want) and not torch.equal(got, self_only)


def naive_first_block_cache(family):
    """Every block runs at step 0; afterwards only block 0, plus the residual the other blocks added at step 0."""
    pipe = tiny(family)
    blocks = pipe.transformer.transformer_blocks
    state = {"call": -1, "residual": None, "head": None}
    originals = [b.forward for b in blocks]

    def head(*args, **kwargs):
        state["call"] += 1
        out = originals[0](*args, **kwargs)
        state["head"] = out
        return out

    def middle(i):
        def f(*args, **kwargs):
            if state["call"] == 0:
                return originals[i](*args, **kwargs)
            x = args[0] if args else kwargs["hidden_states"]
            return x if i < len(blocks) - 1 else state["head"] + state["residual"]
        return f

    def tail(*args, **kwargs):
        if state["call"] == 0:
            out = originals[-1](*args, **kwargs)
            state["residual"] = out - state["head"]
            return out
        return middle(len(blocks) - 1)(*args, **kwargs)

    blocks[0].forward = head
    for i in range(1, len(blocks) - 1):
        blocks[i].forward = middle(i)
    blocks[-1].forward = tail
    try:
        return generate(pipe, family, steps=STEPS)
    finally:
        for b, f in zip(blocks, originals):
            b.forward = f


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_first_block_cache_extremes(family):
    pipe = tiny(family)
    base = generate(pipe, family, steps=STEPS)
    never = DiffusersHook("fbc", {"threshold": 0.0})  # the head residual never changes by less than 0
    never.apply(pipe)
    try:
        assert torch.equal(generate(pipe, family, steps=STEPS), base)
    finally:
        never.remove(pipe)
    always = DiffusersHook("fbc", {"threshold": 1e9})
    always.apply(pipe)
    always.apply(pipe)  # twice is safe
    try:
        got = generate(pipe, family, steps=STEPS)
        again = generate(pipe, family, steps=STEPS)
    finally:
        always.remove(pipe)
    torch.testing.assert_close(got, naive_first_block_cache(family), rtol=0, atol=1e-6)  # (a+r)-a+... rounding
    assert torch.equal(got, again) and not torch.equal(got, base)
    assert torch.equal(generate(pipe, family, steps=STEPS), base)  # removed: the stock model again


def test_first_block_cache_refuses_the_unet():
    pipe = tiny("sd")
    with pytest.raises(DifaError, match="does not support UNet2DConditionModel"):
        DiffusersHook("fbc").apply(pipe)
    base = generate(pipe, "sd", steps=2)
    hook = DiffusersHook("pab")
    hook.apply(pipe)
    hook.remove(pipe)
    assert torch.equal(generate(pipe, "sd", steps=2), base)  # PAB applies and undoes on the UNet


@pytest.mark.parametrize("name, params, message", [
    ("teacache", {}, "unknown diffusers hook"),
    ("pab", {"threshold": 0.1}, "drop threshold"),
    ("pab", {"skip": 0}, "skip must be an integer >= 1"),
    ("pab", {"timestep_range": (5, 1)}, "low < high"),
    ("fbc", {"threshold": -1}, "threshold must be a number >= 0"),
])
def test_bad_hook_parameters(name, params, message):
    with pytest.raises(DifaError, match=message):
        DiffusersHook(name, params)
