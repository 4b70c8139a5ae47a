"""cache-dit's DBCache as a peer (`plan=cachedit:dbcache`): difa runs cache-dit's own code, so its output must equal
calling cache-dit directly, bit for bit; removing it restores the stock pipeline. Skipped without cache-dit."""

from __future__ import annotations

import pytest
import torch

from difa.errors import DifaError
from difa.peers import CacheDit, hook_from_spec
from tests.conftest import generate, tiny

cache_dit = pytest.importorskip("cache_dit")

STEPS = 8


def direct(pipe, family, params):
    """cache-dit called as its README does, with the configs built here from the same numbers."""
    calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=params["taylorseer"]) if params["taylorseer"] else None
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=params["fn_blocks"], Bn_compute_blocks=params["bn_blocks"],
        residual_diff_threshold=params["threshold"], max_warmup_steps=params["warmup_steps"]), calibrator_config=calib)
    try:
        return generate(pipe, family, steps=STEPS)
    finally:
        cache_dit.disable_cache(pipe)


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("taylorseer", [0, 1])
def test_dbcache_through_difa_equals_cache_dit_directly(family, taylorseer):
    pipe = tiny(family)
    base = generate(pipe, family, steps=STEPS)
    params = {"threshold": 10.0, "fn_blocks": 1, "bn_blocks": 0, "warmup_steps": 2, "taylorseer": taylorseer}
    peer = hook_from_spec("cachedit:dbcache", params)
    peer.apply(pipe)
    peer.apply(pipe)  # twice is safe
    try:
        got = generate(pipe, family, steps=STEPS)
        again = generate(pipe, family, steps=STEPS)  # state is reset per pipeline call
    finally:
        peer.remove(pipe)
    assert torch.equal(generate(pipe, family, steps=STEPS), base)  # removed: the stock pipeline again
    want = direct(pipe, family, params)
    assert torch.equal(got, want) and torch.equal(got, again)
    assert not torch.equal(got, base)  # a huge threshold caches every step after the warmup


def test_dbcache_threshold_zero_caches_nothing():
    pipe = tiny("dit")
    base = generate(pipe, "dit", steps=STEPS)
    peer = CacheDit("dbcache", {"threshold": 0.0, "fn_blocks": 1, "warmup_steps": 0})
    peer.apply(pipe)
    try:
        assert torch.equal(generate(pipe, "dit", steps=STEPS), base)
    finally:
        peer.remove(pipe)


@pytest.mark.parametrize("params, message", [
    ({"threshold": -1}, "threshold must be a number >= 0"),
    ({"fn_blocks": 0}, "fn_blocks must be an integer >= 1"),
    ({"taylorseer": 3}, "taylorseer must be 0"),
    ({"skip": 2}, "drop skip"),
])
def test_bad_dbcache_parameters(params, message):
    with pytest.raises(DifaError, match=message):
        CacheDit("dbcache", params)


def test_dbcache_needs_enough_blocks_and_a_supported_pipeline():
    pipe = tiny("dit")
    base = generate(pipe, "dit", steps=2)
    with pytest.raises(DifaError, match="exceeds the model's"):
        CacheDit("dbcache", {"fn_blocks": 99}).apply(pipe)
    assert torch.equal(generate(pipe, "dit", steps=2), base)
