"""The one atomic file writer (slinfer/atomicfile.py): whole contents, final mode, no links followed, no leftovers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from slinfer.atomicfile import write_atomic


def test_replaces_with_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    write_atomic(target, b"new" * 100_000, 0o400)
    assert target.read_bytes() == b"new" * 100_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_never_writes_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "f"
    # A link planted at the temporary name, and the target itself a link: neither is written through.
    (tmp_path / f".f.{os.getpid()}.tmp").symlink_to(victim)
    target.symlink_to(victim)
    write_atomic(target, b"data")
    assert victim.read_text() == "keep"
    assert not target.is_symlink() and target.read_bytes() == b"data"


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "x").write_text("")  # a non-empty folder cannot be replaced by a file
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
