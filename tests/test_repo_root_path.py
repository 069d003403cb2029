"""The checkout's root never stays on sys.path once brigade is imported (``python -m`` and ``-c`` put it there).

Its top-level folders are named like other installed packages: transformers 5.25 imports Hugging
Face's ``kernels``, which the root's ``kernels/`` would shadow (every peer then failed at start).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_brigade_takes_the_checkout_root_off_sys_path() -> None:
    probe = ("import os, sys; import brigade; "
             f"print(any(os.path.abspath(p or os.getcwd()) == {str(ROOT)!r} for p in sys.path))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
