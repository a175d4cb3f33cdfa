"""The git-clone install path: what ``git clone`` (and ComfyUI-Manager, which clones) puts in ``custom_nodes/`` loads.

The end-to-end server tests copy the working tree; this one clones the committed tree, so a file that exists here
but was never committed cannot make it pass. Slow: a fresh Python process imports ComfyUI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from comfy_server import PACK_FOLDER
from comfy_support import import_comfyui

from todo_core.bench.comfyui_path import PACK_ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

LOAD = """
import asyncio, importlib, json, logging, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
records = []
handler = logging.Handler(logging.WARNING)
handler.emit = records.append
logging.getLogger().addHandler(handler)
before = dict(nodes.NODE_CLASS_MAPPINGS)
loaded = asyncio.run(nodes.load_custom_node(sys.argv[2], module_parent="custom_nodes"))
logging.getLogger().removeHandler(handler)
added = sorted(name for name, cls in nodes.NODE_CLASS_MAPPINGS.items() if before.get(name) is not cls)
node = nodes.NODE_CLASS_MAPPINGS.get("ToDoModelPatch")
# comfy-test's instantiation level: import the folder as a package from custom_nodes/, construct every mapped class
sys.path.insert(0, str(Path(sys.argv[2]).parent))
package = importlib.import_module(Path(sys.argv[2]).name)
constructed = [name for name, cls in package.NODE_CLASS_MAPPINGS.items() if cls()]
print(json.dumps({
    "loaded": bool(loaded),
    "inputs": list(node.INPUT_TYPES()["required"]) if node else None,
    "added": added,
    "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get("ToDoModelPatch"),
    "warnings": [record.getMessage() for record in records],
    "constructed": constructed,
}))
"""


def test_a_git_clone_of_the_pack_loads_in_comfyui(tmp_path):
    comfyui = import_comfyui()
    if shutil.which("git") is None or not (PACK_ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the pack")
    target = tmp_path / "custom_nodes" / PACK_FOLDER
    subprocess.run(["git", "clone", "--quiet", str(PACK_ROOT), str(target)], check=True, timeout=120)
    for needed in ("__init__.py", "nodes.py", "todo_core/dit.py", "requirements.txt", "pyproject.toml"):
        assert (target / needed).is_file(), f"{needed} is not committed"
    assert sorted(p.name for p in (target / "workflows").glob("*.json"))
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(comfyui), str(target)],
        cwd=comfyui,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] and "mode" in report["inputs"], report
    # Registered once, under its one name, without a warning from ComfyUI's loader.
    assert report["added"] == ["ToDoModelPatch"], report
    assert report["display_name"] == "ToDo: Token Downsampling"
    assert report["warnings"] == [], report
    assert report["constructed"] == ["ToDoModelPatch"], "comfy-test's instantiation level would find no node"
