"""Telling whoever started a peer that it serves: a JSON ready file for programs, a line for people.

The file (``--ready-file``) is written once the peer serves and is announced, atomically (a
temporary file in the same folder, then a rename), so a reader that finds it finds all of it.
Launchers (``deploy/launcher.py``, the testbed) wait for it instead of reading logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_ready_file(path: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """Writes ``info`` as JSON to ``path`` in one rename (the folder is made if missing)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(info, file)
            file.write("\n")
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_ready_file(path: str | os.PathLike[str]) -> None:
    """The peer no longer serves: a launcher must not take a leftover file for a new start."""
    with contextlib.suppress(OSError):
        Path(path).unlink()


def ready_line(info: dict[str, Any]) -> str:
    """What a person reads in the log when the peer is ready."""
    return (f"ready: peer {info['peer_id']} serves layers {info['layers']} of {info['model_name']} "
            f"at {info.get('announced_address') or info['address']}")
