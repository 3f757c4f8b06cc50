"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary file beside `path` (`<name>.tmp-<pid>`), which then replaces `path` in one
    os.replace: in the same folder the rename is atomic, so readers see the old file or the whole new one. A
    failed write leaves `path` as it was and removes the temporary."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
