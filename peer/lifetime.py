"""Children of a peer die with it, however it dies.

hivemind runs the DHT node in a forked child (which starts a p2pd daemon). If the peer is killed
with SIGKILL, nothing runs its cleanup and those children would live on, holding ports and a DHT
identity. On Linux a forked child can ask the kernel to kill it when its parent dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def children_die_with_this_process() -> None:
    """From now on, every child this process forks is killed when this process dies (Linux only)."""
    if sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=_die_with_parent)
