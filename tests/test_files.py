"""Issue 15's writes and faults: difa.files (atomic writes with normal permissions, targets checked first, a lock)
and the calibrate CLI's use of them. Each check is against what the file system says afterwards."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from difa.errors import DifaError
from difa.files import check_target, target_lock, write_atomic


def write(path, text="new"):
    return write_atomic(path, lambda f: f.write(text), binary=False)


def test_new_files_get_the_umask_mode_and_overwrites_keep_theirs(tmp_path):
    old = os.umask(0o027)
    try:
        p = write(tmp_path / "a.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # 0o666 & ~0o027 (mkstemp alone gives 0600)
    os.chmod(p, 0o604)
    write(p, "again")
    assert stat.S_IMODE(p.stat().st_mode) == 0o604 and p.read_text() == "again"
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_a_symlink_is_written_through_not_replaced(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write(link)
    assert link.is_symlink() and target.read_text() == "new"


@pytest.mark.parametrize("kind", ["directory", "device", "no-permission"])
def test_bad_targets_are_refused_before_any_work(tmp_path, kind):
    if kind == "directory":
        path, message = tmp_path, "is a directory"
    elif kind == "device":
        path, message = "/dev/null", "is not a regular file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        path, message = ro / "p.json", "no permission to write"
    with pytest.raises(DifaError, match=message):
        check_target(path)
    with pytest.raises(DifaError, match=message):
        write(path)
    assert os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text("old")

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DifaError, match="No space left on device; the previous file, if any, is unchanged"):
        write_atomic(p, full)
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["plan.json"]


def test_the_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path):
    p = tmp_path / "plan.json"
    with target_lock(p):
        child = subprocess.run([sys.executable, "-c", (
            "from difa.files import target_lock\n"
            f"with target_lock({str(p)!r}): pass\n")], capture_output=True, text=True)
        assert child.returncode != 0 and "is writing" in child.stderr
    assert not (tmp_path / ".plan.json.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".plan.json.lock").write_text(str(dead.pid))  # left by a killed run
    with target_lock(p):
        pass


def test_plan_save_has_normal_permissions(tmp_path):
    from tests.test_plan import make

    old = os.umask(0o022)
    try:
        p = make().save(tmp_path / "sub" / "p.json")
    finally:
        os.umask(old)
    assert p.read_text() == make().to_json() and stat.S_IMODE(p.stat().st_mode) == 0o644
