"""Whether a process still exists, for files named after the process that wrote them (the run
lock, `prepare`'s temporary outputs). Imports nothing heavy: `prepare` stays torch-free."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True
