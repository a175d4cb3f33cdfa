"""The benchmark's child processes: ComfyUI picks its attention backend at import, and a model's memory is only
given back when its process ends, so each ComfyUI-level run (``benchmarks/*_level.py``) has a process of its own.

A child prints one JSON row per measured setting on stdout (for the progress bar) and writes its results to the
file named by ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_child(
    command: list[str], env: dict[str, str], on_row: Callable[[dict], None], quiet: bool = True
) -> tuple[int, Any]:
    """Run ``command --out FILE``; its exit status and what it wrote to FILE (``None`` when it wrote nothing).

    ``quiet`` drops the child's stderr (its log); otherwise it goes to this process's stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        with subprocess.Popen(
            [*command, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None,
            text=True,
            env={**os.environ, **env},
        ) as child:
            for line in child.stdout or ():
                if line.startswith("{"):
                    on_row(json.loads(line))
        return child.returncode, json.loads(out.read_text()) if out.is_file() else None
