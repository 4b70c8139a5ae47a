"""Technique registry: method name (as written in plans) -> technique module.

Adding a technique is one file with the common skeleton (NAME, LETTER, KINDS, READS_CACHE, NEEDS_METRIC,
DEFAULT_CANDIDATE, Config, flops, execute or run) plus one entry in TECHNIQUES below.
"""

from difa.techniques import (agent, asc, ast, forecast, full, mlp_reuse, reuse, tgate, tome, wars,
                             wars_asc)

# Registry order is the greedy's tie order among equal costs (`tgate` before `ast`: see calibration).
TECHNIQUES = (full, tgate, ast, wars, asc, wars_asc, tome, agent, reuse, forecast, mlp_reuse)
REGISTRY = {m.NAME: m for m in TECHNIQUES}
BLOCK = "block"


def kind_of(layer_name: str) -> str:
    """"attn1" (self-attention) or "attn2" (cross-attention), from the module name's last part."""
    return layer_name.rsplit(".", 1)[-1]


def letters() -> dict[str, str]:
    """Method -> the one character the calibration summary prints for its cells."""
    return {name: t.LETTER for name, t in REGISTRY.items()}


def candidate_kinds(method: str) -> tuple[str, ...]:
    """The kinds of layers calibration proposes `method` on (a technique may narrow its KINDS)."""
    t = REGISTRY[method]
    return tuple(getattr(t, "CANDIDATE_KINDS", t.KINDS))


def is_block_method(method: str) -> bool:
    return BLOCK in REGISTRY[method].KINDS and method != full.NAME


def attention_methods(methods) -> list[str]:
    return [m for m in methods if m in REGISTRY and not is_block_method(m)]


def block_methods(methods) -> list[str]:
    return [m for m in methods if m in REGISTRY and is_block_method(m)]
