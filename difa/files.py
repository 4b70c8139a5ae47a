"""Writing output files safely: atomic replacement with normal permissions, targets checked before any work, and a
lock so that two runs never both report writing one file.

- `check_target(path)`: refuses a directory, a device or other non-regular file, a location without write
  permission; a symlink is followed (the file it points to is written, the link stays).
- `write_atomic(path, write)`: a temporary file in the target's folder, then rename over it. A new file gets the
  umask's permissions (mkstemp's are 0600), an overwritten one keeps its mode. OSError (ENOSPC, EACCES) becomes a
  one-line DifaError and the old file is left as it was.
- `target_lock(path)`: a `.<name>.lock` file next to the target holding the writer's pid; a second writer is
  refused with a one-line error; a lock left by a killed process (its pid no longer runs) is taken over.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, IO, Iterator

from difa.errors import DifaError


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(old)
    return old


def check_target(path: str | os.PathLike, what: str = "out", *, follow: bool = True, example: str = "plan.json") -> Path:
    """The regular file a write to `path` will replace, or a one-line error saying why not. `follow`: a symlink at
    `path` (a path the user named) is written through; a side file the user did not name (a checkpoint, a heatmap,
    a lock: follow=False) must never be, or a planted link would make difa overwrite what it points to."""
    given = Path(path)
    check_names(given, what)
    if not follow and given.is_symlink():
        raise DifaError(f"{what} {str(given)!r} is a symlink; difa never writes its side files through a link: "
                        "remove it (or choose another out=)")
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    if target.exists() or target.is_symlink():
        mode = target.lstat().st_mode if not target.exists() else target.stat().st_mode
        if stat.S_ISDIR(mode):
            raise DifaError(f"{what}={str(given)!r} is a directory; give a file path, e.g. {what}={given / example}")
        if not stat.S_ISREG(mode):
            raise DifaError(f"{what}={str(given)!r} is not a regular file (a device, pipe or socket); give a file path")
    folder = target.parent
    existing = folder
    while not existing.exists():  # the first existing ancestor decides whether the folders can be made
        existing = existing.parent
    if not existing.is_dir():
        raise DifaError(f"{what}={str(given)!r}: {str(existing)!r} is not a folder; give a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DifaError(f"{what}={str(given)!r}: no permission to write in {str(existing)!r}; choose another {what}=")
    return target


def check_names(path: Path, what: str, room: int = NAME_MAX - 20) -> None:
    """Every name in `path` fits the file system, the last one with `room` to spare for the side files and temporary
    names difa builds from it (`.<name>.lock`, `.<name>.calib.json`, `.<name>.XXXXXXXX.tmp`)."""
    for i, part in enumerate(path.parts):
        size = len(os.fsencode(part))
        if size > (room if i == len(path.parts) - 1 else NAME_MAX):
            raise DifaError(f"{what}={str(path)[:40]!r}... has a {size}-byte name; file names are at most {NAME_MAX} "
                            f"bytes (difa needs {NAME_MAX - room} of them spare for its side files): choose a shorter one")


def check_folder(path: str | os.PathLike, what: str = "out") -> Path:
    """A folder difa will write files into (generate's images): absent (it is made) or a folder, never a file or a
    device, with a name the file system takes, under a folder difa may write in."""
    given = Path(path)
    check_names(given, what)
    if given.exists() and not given.is_dir():
        raise DifaError(f"{what}={str(given)!r} is a file, not a folder; generate writes its images into a folder: "
                        f"choose one, e.g. {what}=outputs/images")
    if given.exists():
        if not os.access(given, os.W_OK | os.X_OK):
            raise DifaError(f"{what}={str(given)!r}: no permission to write in it; choose another {what}=")
        return given
    check_target(given / "grid.png", what)  # the parents: names, folders, permissions
    return given


def check_side_file(path: str | os.PathLike, what: str) -> None:
    """A side file difa reads and writes (a checkpoint): absent, or a regular file that is not a link."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise DifaError(f"{what} {str(p)!r} is a link, folder, pipe or device; difa only reads and writes regular "
                        "files there: remove it (or choose another out=)")


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True, what: str = "out",
                 follow: bool = True) -> Path:
    """Call write(file) on a temporary file next to the target of `path`, then rename it over the target
    (`follow`: see check_target)."""
    target = check_target(path, what, follow=follow)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise DifaError(f"could not write {str(path)!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DifaError(f"could not write {str(path)!r}: {e.strerror or e}; the previous file, if any, is "
                            "unchanged") from None
        raise
    return Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def target_lock(path: str | os.PathLike, what: str = "out") -> Iterator[Path]:
    """Hold `.<name>.lock` next to the target of `path` while writing it; refuse if a live process holds it."""
    target = check_target(path, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not stat.S_ISREG(lock.lstat().st_mode):  # a link, folder or FIFO planted there: never read or follow it
                raise DifaError(f"{str(lock)!r} (the lock of {str(path)!r}) is not a regular file; remove it or "
                                f"choose another {what}=") from None
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise DifaError(f"another run (pid {pid}) is writing {str(path)!r}; wait for it or choose another "
                                f"{what}=") from None
            lock.unlink(missing_ok=True)  # left by a killed run
    else:
        raise DifaError(f"could not lock {str(path)!r} ({lock} keeps reappearing); choose another {what}=")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        yield target
    finally:
        lock.unlink(missing_ok=True)
