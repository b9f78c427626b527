"""The engine Python runs as root only where nobody else can change what it imports (issue 27): the tree check
on folders made for each case, and the import-path probe through a stand-in interpreter that prints a path,
asked as an unprivileged uid."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from slinfer.agent import enginetrust

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: files of other owners")


@pytest.fixture
def tree() -> Iterator[Path]:
    """A root-owned tree with the modes of an installed venv, in a folder whose parents are root's (/tmp is
    sticky)."""
    top = Path(tempfile.mkdtemp(prefix="slinfer-trust-"))
    top.chmod(0o755)
    site = top / "lib" / "site-packages"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    (site / "easy.pth").write_text("import os\n")
    for path in (top / "lib", site, site / "vllm"):
        path.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_a_tree_of_roots_alone_is_trusted(tree: Path) -> None:
    verdict = enginetrust.check_tree([str(tree / "lib" / "site-packages")])
    assert verdict.trusted, verdict.problem
    assert verdict.checked >= 5


@pytest.mark.parametrize("fault", ["file-world-writable", "folder-group-writable", "file-of-another-user",
                                   "parent-of-another-user", "link-to-a-writable-folder"])
def test_what_another_user_could_change_is_named_with_its_owner(tree: Path, fault: str) -> None:
    site = tree / "lib" / "site-packages"
    if fault == "file-world-writable":
        (site / "easy.pth").chmod(0o666)
        named = f"{site / 'easy.pth'} is writable by its group or by everyone (mode 666)"
    elif fault == "folder-group-writable":
        (site / "vllm").chmod(0o775)
        named = f"{site / 'vllm'} is writable by its group or by everyone (mode 775)"
    elif fault == "file-of-another-user":
        os.chown(site / "vllm" / "__init__.py", 65534, 65534)
        named = f"{site / 'vllm' / '__init__.py'} belongs to nobody, not root"
    elif fault == "parent-of-another-user":
        os.chown(tree / "lib", 65534, 65534)
        named = f"{tree / 'lib'} belongs to nobody, not root"
    else:
        elsewhere = tree / "elsewhere"
        elsewhere.mkdir()
        elsewhere.chmod(0o777)
        (site / "linked").symlink_to(elsewhere)
        named = f"{site / 'linked'} -> {elsewhere} is writable by its group or by everyone (mode 777)"
    verdict = enginetrust.check_tree([str(site)])
    assert verdict.problem == named


def test_a_sticky_root_folder_above_is_not_a_fault(tree: Path) -> None:
    assert os.stat("/tmp").st_mode & 0o1777 == 0o1777, "the control needs /tmp sticky and world-writable"
    assert enginetrust.check_tree([str(tree)]).trusted


def test_the_import_path_is_asked_as_nobody_and_checked(tree: Path) -> None:
    site = tree / "lib" / "site-packages"
    python = tree / "python"
    # A stand-in interpreter: prints who ran it into the path list, as the real one prints sys.path.
    python.write_text(f"#!/bin/sh\necho \"[\\\"$0\\\", \\\"{site}\\\", \\\"/uid/$(id -u)\\\"]\"\n")
    python.chmod(0o755)
    env = {"PATH": f"{tree}:/usr/bin:/bin"}
    paths = enginetrust.import_path("python", env)
    assert paths[0] == str(python) and str(site) in paths and "/uid/65534" in paths
    assert enginetrust.check("python", env).trusted
    (site / "easy.pth").chmod(0o646)
    assert "easy.pth is writable" in enginetrust.check("python", env).problem
    assert "is not found on PATH" in enginetrust.check("no-such-python", env).problem

