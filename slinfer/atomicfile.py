"""Writing a file so that readers see the old contents or the new, never a part: the one writer the agent's engine
records and job files and the controller's key file use.

Responsible for: a temporary file next to the target (created exclusively, never through a link, with the final
mode from the start), writing every byte, handing it to its owner when running as root, fsync, and the rename
over the target; removing the temporary file when anything fails. Not responsible for: the contents, folders
and their modes, or what a caller does with an OSError (it propagates).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Replaces `path` with `data`; `owner` (uid, gid) is applied only when running as root."""
    # One temporary name per process: two writers of the same file must not share one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # A leftover from a crashed writer of this pid would make O_EXCL fail.
    tmp.unlink(missing_ok=True)
    try:
        # O_EXCL and O_NOFOLLOW: in a folder whose names are predictable, never write through a planted link.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
