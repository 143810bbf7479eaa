"""Shared by the build_* tools: write a shipped data file, or check it is reproduced."""
from __future__ import annotations

from pathlib import Path


def write_or_check(path: Path, data: bytes, summary: str, check: bool) -> int:
    """With ``check``, compare ``data`` to the file and return 1 if they differ; else write it."""
    if check:
        same = path.exists() and path.read_bytes() == data
        print(("ok      " if same else "DIFFERS ") + summary)
        return 0 if same else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print("wrote   " + summary)
    return 0
