class DifaError(Exception):
    """A user-facing error: one line saying what was wrong and how to fix it."""
