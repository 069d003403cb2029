"""brigade: run large language models across a peer-to-peer swarm."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _drop_repo_root_from_path() -> None:
    """Takes this checkout's root off ``sys.path`` (``python -m`` and ``-c`` put the working folder there).

    The root holds folders named like other installed packages: ``kernels`` is also Hugging Face's,
    which transformers (5.25 and later) imports; from the root it would find ours and fail. brigade's
    own modules come through the installed ``brigade`` package (an editable finder), never the root.
    """
    root = _os.path.dirname(_os.path.abspath(__file__))
    cwd = _os.getcwd()
    _sys.path[:] = [entry for entry in _sys.path if _os.path.abspath(entry or cwd) != root]


_drop_repo_root_from_path()
