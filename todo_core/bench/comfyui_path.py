"""Where a ComfyUI checkout is: ``COMFYUI_PATH``, then ``~/comfy/ComfyUI`` (comfy-cli's workspace), then the
ComfyUI this pack sits in (``ComfyUI/custom_nodes/<pack>``). Path logic only: nothing here imports ComfyUI."""

from __future__ import annotations

import os
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
ENABLE_HINT = (
    "set COMFYUI_PATH to a ComfyUI checkout (v0.8.0 is the tested version), clone one to ~/comfy/ComfyUI, "
    "or run from inside ComfyUI/custom_nodes/; then pip install -r <ComfyUI>/requirements.txt"
)


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui() -> Path | None:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    return next((c.resolve() for c in candidates if is_comfyui(c)), None)
