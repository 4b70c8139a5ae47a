"""Cache memory: the accounting of what a plan keeps across steps (difa.cost.cache_elements) equals
the bytes the engine actually holds after a generation, tensor by tensor (Engine.cache_bytes / peak_cache_bytes)."""

from __future__ import annotations

import pytest

import difa
from difa.calibration import fixed_plan
from difa.cost import cache_elements
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


def test_max_cache_mb_caps_the_calibrated_plan():
    """Calibration under max_cache_mb: the plan's block caches, measured on the engine while it runs the plan at the
    calibration batch, stay within the cap. Forecast needs two residuals per block: a cap of 2k residuals lets
    exactly k blocks skip, a cap of 0 gives an all-full plan."""
    from difa.calibration import calibrate_pipeline
    from difa.errors import DifaError
    from difa.models import pipeline_call_kwargs
    from tests.conftest import INPUTS

    pipe = tiny("dit")
    kw = dict(threshold=1.0, steps=STEPS, guidance_scale=GUIDANCE["dit"], seed=0, latency_cache=None,
              call_kwargs=pipeline_call_kwargs("dit"), candidates=["forecast"])
    free = calibrate_pipeline(pipe, INPUTS["dit"], **kw)
    n_blocks = len(free.blocks)
    assert all("forecast" in r for r in free.blocks)  # unconstrained, every block forecasts
    c = pipe.transformer.config  # one residual: (CFG batch, tokens, width) in float32
    slot = 2 * len(INPUTS["dit"]) * (c.sample_size // c.patch_size) ** 2 * c.num_attention_heads * c.attention_head_dim * 4
    for k in (0, 1, n_blocks - 1):
        cap = 2 * k * slot / 2**20 + 1e-6
        plan = calibrate_pipeline(pipe, INPUTS["dit"], max_cache_mb=cap, **kw)
        assert sum(set(r) != {"full"} for r in plan.blocks) == k
        engine = difa.apply_plan(pipe, plan)
        generate(pipe, "dit")
        difa.remove_plan(pipe)
        assert 0 < engine.peak_cache_bytes <= cap * 2**20 if k else engine.peak_cache_bytes == 0
        assert plan.calibration["max_cache_mb"] == cap
    with pytest.raises(DifaError, match="max_cache_mb"):
        calibrate_pipeline(pipe, INPUTS["dit"], max_cache_mb=-1, **kw)
    with pytest.raises(DifaError, match="max_cache_mb"):
        calibrate_pipeline(pipe, INPUTS["dit"], max_cache_mb=10, **{**kw, "search": "greedy"})


def test_cache_slots_give_reuse_first_then_forecast_where_it_gains_most():
    """Three blocks of 1 MB residual slots: block 0's residual grows linearly over the steps (forecast exact, reuse
    not), block 1's is constant (both exact), block 2's is noise (both poor). 4 MB: every block one slot (reuse),
    the fourth to block 0 (forecast gains most there); 2 MB: the two blocks cheapest to skip; 0: none."""
    import torch

    from difa.calibration.cache_cap import cache_slots
    from difa.calibration.table import Table, Trajectory

    steps, g = 6, torch.Generator().manual_seed(0)
    base = torch.randn(1, 8, 4, generator=g)
    residual = [{s: base * (1 + s) for s in range(steps)}, {s: base.clone() for s in range(steps)},
                {s: torch.randn(1, 8, 4, generator=g) for s in range(steps)}]
    table = Table(Trajectory(residual, [{s: 1.0 for s in range(steps)} for _ in range(3)], torch.empty(0)))
    mb = 2**20
    methods = ("reuse", "forecast")
    assert cache_slots(table, steps, methods, [mb] * 3, 4 * mb) == [("reuse", "forecast"), ("reuse",), ("reuse",)]
    assert cache_slots(table, steps, methods, [mb] * 3, 2 * mb) == [("reuse",), ("reuse",), ()]
    assert cache_slots(table, steps, methods, [mb] * 3, 0) == [(), (), ()]


def test_calibration_summary_puts_the_cache_beside_the_weights(tmp_path):
    """The summary's cache line: the plan's cache MB (from the accounting) next to the denoiser's own weights."""
    from difa.calibration import calibrate_pipeline
    from difa.cli.calibrate import cache_mb, summary, weights_mb
    from difa.models import pipeline_call_kwargs
    from tests.conftest import INPUTS

    pipe = tiny("dit")
    held = {t.data_ptr(): t.untyped_storage().nbytes() for m in pipe.transformer.modules()  # buffers not saved too
            for t in [*m._parameters.values(), *m._buffers.values()] if t is not None}
    naive = sum(held.values()) / 2**20
    assert weights_mb(pipe) == pytest.approx(naive, rel=1e-12)
    plan = calibrate_pipeline(pipe, INPUTS["dit"], threshold=1.0, steps=STEPS, guidance_scale=GUIDANCE["dit"], seed=0,
                              latency_cache=None, call_kwargs=pipeline_call_kwargs("dit"), candidates=["forecast"])
    plan = plan.with_(calibration={**plan.calibration, "weights_mb": weights_mb(pipe)})
    held, rows = cache_mb(plan)
    line = next(x for x in summary(plan, tmp_path / "p.json").splitlines() if x.startswith("cache"))
    assert held > 0 and f"{held:.3g} MB held" in line and f"batch of {rows} rows" in line
    assert f"the denoiser's weights: {naive:.3g} MB" in line
