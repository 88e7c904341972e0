"""Which Convs a user asked for: ``--include`` / ``--exclude`` shell-style globs.

One rule for every front end (the ONNX pass matches node names, the PyTorch layer module
names): a name is selected when it matches some include pattern (or none are given) and
no exclude pattern.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence


def selection_reason(name: str, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    """None when ``name`` is selected, else why not (for the conversion report)."""
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return "not matched by --include"
    for pattern in exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by --exclude {pattern}"
    return None
