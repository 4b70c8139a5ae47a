"""Technique registry: method name (as written in plans) -> technique module."""

from difa.techniques import agent, asc, ast, full, tgate, tome, wars, wars_asc

REGISTRY = {m.NAME: m for m in (full, wars, ast, asc, wars_asc, tome, agent, tgate)}


def kind_of(layer_name: str) -> str:
    """"attn1" (self-attention) or "attn2" (cross-attention), from the module name's last part."""
    return layer_name.rsplit(".", 1)[-1]
