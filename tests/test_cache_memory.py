"""Cache memory: the accounting of what a plan keeps across steps (difa.calibration.cost.cache_elements) equals
the bytes the engine actually holds after a generation, tensor by tensor (Engine.cache_bytes / peak_cache_bytes)."""

from __future__ import annotations

import pytest

import difa
from difa.calibration import fixed_plan
from difa.calibration.cost import cache_elements
from tests.conftest import GUIDANCE, STEPS, generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PLANS = {
    "ast-wars": dict(method=lambda i, t: ("full", "ast", "wars", "ast")[t % 4]),
    "wars-every-layer": dict(method=lambda i, t: "full" if t % 3 == 0 else "wars"),
    "tome-agent": dict(method=lambda i, t: ("tome", "agent", "full")[(i + t) % 3]),
    "blocks": dict(method=lambda i, t: "full", block=lambda j, t: ("full", "reuse", "forecast", "mlp_reuse")[t % 4] if j % 2 else "full"),
    "forecast-only": dict(method=lambda i, t: "full", block=lambda j, t: "forecast" if t >= 3 else "full"),
    "mixed": dict(method=lambda i, t: ("full", "ast")[t % 2], block=lambda j, t: "reuse" if j == 0 and t % 2 else "full"),
}


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("name", list(PLANS))
def test_accounted_cache_equals_the_tensors_held(family, name):
    pipe = tiny(family)
    kw = dict(PLANS[name])
    plan = fixed_plan(pipe, kw.pop("method"), steps=STEPS, guidance_scale=GUIDANCE[family], **kw)
    engine = difa.apply_plan(pipe, plan)
    generate(pipe, family)
    held = engine.cache_bytes()
    shapes = [engine.shapes.get(i) for i in range(len(plan.layers))]
    want = cache_elements(plan, shapes) * 4  # float32
    assert held == want and engine.peak_cache_bytes <= want
    generate(pipe, family)  # a second generation: the reset emptied, the same slots filled again
    assert engine.cache_bytes() == held and engine.peak_cache_bytes == held
    difa.remove_plan(pipe)


def test_tgate_gated_cache_on_pixart():
    pipe = tiny("pixart")
    plan = fixed_plan(pipe, lambda i, t: "tgate" if t >= 2 else "full", steps=STEPS, guidance_scale=GUIDANCE["pixart"],
                      kinds=("attn2",))
    engine = difa.apply_plan(pipe, plan, collapse_cfg=False)
    generate(pipe, "pixart")
    shapes = [engine.shapes.get(i) for i in range(len(plan.layers))]
    assert engine.cache_bytes() == cache_elements(plan, shapes) * 4 > 0
    difa.remove_plan(pipe)
