"""Routing a module's calls through the engine without touching its `forward`.

The engine decides per step whether a block runs (and a submodule, for the cells that replace one). It used to
wrap `module.forward`; other tools wrap `forward` too (accelerate's offload hooks set `module.forward`, and undo it by
`module.forward = module._old_forward`), and `torch.compile` traces `forward`, so a step-dependent wrapper there
either broke undo or recompiled every step. Instead the module's class is swapped for a subclass of the same name
whose `__call__` asks the module's route: the route decides and, to compute, calls the stock `__call__` (hooks,
accelerate's forward, a compiled `_compiled_call_impl` from `module.compile()` / diffusers'
`compile_repeated_blocks`, all as they are). The route runs outside any compiled region (`torch.compiler.disable`):
its decisions read the engine's step counter, which a traced route would guard on (a recompile per step).

Undo restores the class and drops the route. A module whose class someone swapped again after us keeps our class
in its MRO; with no route that class only forwards to the stock call.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

ROUTE = "_difa_route"  # instance attribute: route(call, *args, **kwargs), `call` the stock __call__ bound to the module
ROUTED = "_difa_routed"  # class attribute marking our subclasses: their stock class


def _routed_class(cls: type) -> type:
    """A subclass of `cls` with the same name and module (diffusers' compile_repeated_blocks matches blocks by class
    name) whose __call__ goes through the instance's route."""
    stock_call = cls.__call__

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        route = self.__dict__.get(ROUTE)
        call = lambda *a, **k: stock_call(self, *a, **k)  # noqa: E731
        return call(*args, **kwargs) if route is None else route(call, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, ROUTED: cls, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


class Router:
    """The routes one engine installs, and their exact undo. Each stock class gets one routed subclass per Router."""

    def __init__(self) -> None:
        self._classes: dict[type, type] = {}
        self._modules: list[torch.nn.Module] = []

    def route(self, module: torch.nn.Module, route: Callable[..., Any]) -> None:
        stock = type(module).__dict__.get(ROUTED, type(module))
        if stock not in self._classes:
            self._classes[stock] = _routed_class(stock)
        module.__class__ = self._classes[stock]
        module.__dict__[ROUTE] = route
        self._modules.append(module)

    def unroute(self) -> None:
        for module in self._modules:
            module.__dict__.pop(ROUTE, None)
            cls = type(module)
            if cls in self._classes.values():
                module.__class__ = cls.__dict__[ROUTED]
        self._modules.clear()
