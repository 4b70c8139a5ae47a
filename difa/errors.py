class DifaError(Exception):
    """A user-facing error: one line saying what was wrong and how to fix it."""


def need(extra: str, modules: tuple[str, ...], what: str) -> None:
    """A one-line error naming the extra to install when an optional dependency of `what` is missing."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DifaError(f"{what} needs {', '.join(missing)}, which the core install leaves out: "
                        f"pip install 'difa[{extra}]'")
