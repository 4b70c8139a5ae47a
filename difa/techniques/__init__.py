"""Technique registry: method name (as written in plans) -> technique module."""

from difa.techniques import asc, ast, full, wars, wars_asc

REGISTRY = {m.NAME: m for m in (full, wars, ast, asc, wars_asc)}
