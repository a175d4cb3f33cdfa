"""Where a ComfyUI checkout is: ``COMFYUI_PATH``, then ``~/comfy/ComfyUI`` (comfy-cli's workspace), then the
ComfyUI this pack sits in (``ComfyUI/custom_nodes/<pack>``), then the tested host unpacked into a cache folder.

Path logic only: nothing here imports ComfyUI.

    python -m todo_core.bench.comfyui_path     # prints the ComfyUI root, unpacking the tested host if needed
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tarfile
import tempfile
from pathlib import Path

logger = logging.getLogger("comfyui_todo")

PACK_ROOT = Path(__file__).resolve().parents[2]
TESTED_VERSION = "0.8.0"
HOST_ARCHIVE = PACK_ROOT.parent / "shared" / "hosts" / f"ComfyUI-v{TESTED_VERSION}.tar.gz"
"""The tested ComfyUI source tree, shipped beside the project so that a machine without GitHub runs every test."""
ENABLE_HINT = (
    f"set COMFYUI_PATH to a ComfyUI checkout (v{TESTED_VERSION} is the tested version), clone one to "
    f"~/comfy/ComfyUI, run from inside ComfyUI/custom_nodes/, or provide {HOST_ARCHIVE}; "
    "then pip install -r <ComfyUI>/requirements.txt"
)


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "nodes.py").is_file()


def host_cache_dir() -> Path:
    """Where the tested host is unpacked: ``$COMFYUI_TODO_CACHE`` or ``~/.cache/comfyui-todo``."""
    base = os.environ.get("COMFYUI_TODO_CACHE") or Path.home() / ".cache" / "comfyui-todo"
    return Path(base).expanduser() / "hosts" / f"ComfyUI-v{TESTED_VERSION}"


def find_comfyui() -> Path | None:
    """An existing ComfyUI checkout, the unpacked tested host included; ``None`` when there is none."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    candidates.append(host_cache_dir() / "ComfyUI")
    return next((c.resolve() for c in candidates if is_comfyui(c)), None)


def unpack_host(archive: Path = HOST_ARCHIVE, destination: Path | None = None) -> Path:
    """Unpack the tested ComfyUI source tree (a ``ComfyUI/`` folder) into ``destination``; return its root.

    Unpacked into a temporary sibling and renamed into place, so that an interrupted
    run never leaves a half tree that :func:`find_comfyui` would take for a checkout.
    """
    destination = destination or host_cache_dir()
    root = destination / "ComfyUI"
    if is_comfyui(root):
        return root.resolve()
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination) as staging, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name == "ComfyUI" or m.name.startswith("ComfyUI/")]
        if not members:
            raise RuntimeError(f"{archive} does not hold a ComfyUI/ folder")
        extract = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=members, **extract)
        Path(staging, "ComfyUI").rename(root)
    logger.info("Unpacked ComfyUI v%s from %s into %s", TESTED_VERSION, archive, root)
    return root.resolve()


def ensure_comfyui() -> Path | None:
    """A ComfyUI checkout to test against: an existing one, else the tested host unpacked from the archive."""
    found = find_comfyui()
    if found is not None or not HOST_ARCHIVE.is_file():
        return found
    return unpack_host()


def comfyui_version(root: Path) -> str:
    """The version a ComfyUI tree declares (``comfyui_version.py``), or ``unknown``."""
    try:
        text = (root / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return match.group(1) if match else "unknown"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    found = ensure_comfyui()
    if found is None:
        sys.exit(f"ComfyUI not found: {ENABLE_HINT}")
    sys.stdout.write(f"{found}\n")
