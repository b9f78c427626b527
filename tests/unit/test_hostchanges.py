"""The bed's changes to the host are recorded and undone (hostchanges.py), and `stop_daemon` tells a stop from a
stale pid file (devcluster.py)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pwd
import stat
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from slinfer.dev import devcluster, hostchanges


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_search_bits_are_recorded_once_and_restored(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    closed, open_ = tmp_path / "closed", tmp_path / "open"
    closed.mkdir(mode=0o700)
    open_.mkdir(mode=0o755)
    closed.chmod(0o700)
    changed = hostchanges.make_searchable([closed, open_], record)
    assert changed == [closed]
    assert _mode(closed) == 0o701
    # A second `up` sees 0701 already: the record keeps the mode from before the first.
    assert hostchanges.make_searchable([closed], record) == []
    assert json.loads(record.read_text())["modes"] == {str(closed): [0o700, 0o701]}
    said = hostchanges.undo(record)
    assert _mode(closed) == 0o700 and _mode(open_) == 0o755
    assert said == [f"{closed} restored to 700"]
    assert not record.exists()


def test_a_mode_changed_since_is_left_alone(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    folder = tmp_path / "f"
    folder.mkdir()
    folder.chmod(0o750)
    hostchanges.make_searchable([folder], record)
    assert _mode(folder) == 0o751
    folder.chmod(0o755)  # an administrator opened it meanwhile
    said = hostchanges.undo(record)
    assert _mode(folder) == 0o755
    assert "someone changed it since" in said[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="creates and removes a user (CI and make test run as root)")
def test_recorded_users_are_removed(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    user = "slinfer-hc-test"
    subprocess.run(["userdel", "--remove", user], capture_output=True, check=False)
    assert hostchanges.create_user(user, lambda u: subprocess.run(["useradd", "--create-home", "--user-group", u],
                                                                  check=True, capture_output=True), record)
    home = Path(pwd.getpwnam(user).pw_dir)
    assert home.is_dir()  # positive control: the user and its home exist before the undo
    said = hostchanges.undo(record)
    assert said == [f"removed the user {user}"]
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    assert not home.exists()
    assert not record.exists()


def test_stop_daemon_reports_a_stale_pid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bed = devcluster.Bed(tmp_path, 29900, slurm="")
    (tmp_path / "pids").mkdir()
    done = subprocess.Popen(["true"])
    done.wait()
    bed.pidfile("slurmd").write_text(json.dumps([done.pid, time.time()]))
    assert devcluster.stop_daemon(bed, "slurmd") == 0
    assert "names no running slurmd" in capsys.readouterr().err
    assert not bed.pidfile("slurmd").exists()


def test_stop_daemon_returns_the_pid_it_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bed = devcluster.Bed(tmp_path, 29900, slurm="")
    (tmp_path / "pids").mkdir()
    proc = subprocess.Popen(["sleep", "60"])
    bed.pidfile("slurmd").write_text(json.dumps([proc.pid, psutil.Process(proc.pid).create_time()]))
    assert devcluster.stop_daemon(bed, "slurmd") == proc.pid
    assert proc.wait(5) is not None
    assert capsys.readouterr().err == ""


def test_a_bed_going_up_keeps_the_host_changes_another_beds_down_would_undo(tmp_path: Path) -> None:
    """CI: the 26.05 bed's `down` (run before its own `up`) removed the users the 24.11 bed, still going up and
    so with no slurmctld to be seen, had just made; its jobs then failed "uid 1002 has no user name"."""
    record = tmp_path / "record.json"
    folder = tmp_path / "f"
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    hostchanges.make_searchable([folder], record)

    def busy(changes: hostchanges.HostChanges) -> list[str]:
        return changes.others_starting("/tmp/bed-b")

    with hostchanges.starting("/tmp/bed-a", record):
        assert json.loads(record.read_text())["starting"] == {"/tmp/bed-a": os.getpid()}
        said = hostchanges.undo(record, busy=busy)  # bed b's down while bed a goes up
        assert said == ["host changes kept: other beds run (/tmp/bed-a)"]
        assert _mode(folder) == 0o701
        # A bed's own `up` does not keep its own down from undoing.
        assert hostchanges.HostChanges.load(record).others_starting("/tmp/bed-a") == []
    # The control: once bed a's `up` is over (its slurmctld is what shows it then), the undo happens.
    assert hostchanges.undo(record, busy=busy) == [f"{folder} restored to 700"]
    assert not record.exists()


def test_a_dead_process_going_up_does_not_keep_the_host_changes(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    dead = subprocess.Popen(["true"])
    dead.wait()
    hostchanges.HostChanges(starting={"/tmp/bed-a": dead.pid}).save(record)
    assert hostchanges.HostChanges.load(record).others_starting("/tmp/bed-b") == []
    hostchanges.HostChanges(starting={"/tmp/bed-a": os.getpid()}).save(record)  # the control: alive
    assert hostchanges.HostChanges.load(record).others_starting("/tmp/bed-b") == ["/tmp/bed-a"]


def test_two_beds_making_a_user_at_once_make_it_once(tmp_path: Path) -> None:
    record = tmp_path / "host-changes.json"
    made: list[str] = []

    passwd = threading.Lock()

    def useradd(user: str) -> None:  # as useradd: a moment's work, then exit 9 when the name is in use
        time.sleep(0.1)
        with passwd:
            if user in made:
                raise subprocess.CalledProcessError(9, ["useradd", user])
            made.append(user)

    def exists(user: str) -> bool:
        return user in made

    def naive(user: str) -> bool:  # control: look, then make, without the record's lock
        if exists(user):
            return False
        useradd(user)
        return True

    for make_one, user in ((lambda u: hostchanges.create_user(u, useradd, record, exists), "alice"), (naive, "bob")):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = [f.exception() or f.result() for f in [pool.submit(make_one, user) for _ in range(2)]]
        if user == "alice":
            assert sorted(results, key=str) == [False, True] and made.count("alice") == 1
            assert json.loads(record.read_text())["users"] == ["alice"]
        else:
            assert any(isinstance(r, subprocess.CalledProcessError) for r in results), results
