"""The git-clone install path: what ``git clone`` (and ComfyUI-Manager, which clones) puts in ``custom_nodes/`` loads.

The end-to-end server tests copy the working tree; this one clones the committed tree, so a file that exists here
but was never committed cannot make it pass. Slow: a fresh Python process imports ComfyUI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from comfy_server import PACK_FOLDER
from comfy_support import import_comfyui

from todo_core.bench.comfyui_path import PACK_ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

LOAD = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
loaded = asyncio.run(nodes.load_custom_node(sys.argv[2], module_parent="custom_nodes"))
node = nodes.NODE_CLASS_MAPPINGS.get("ToDoModelPatch")
print(json.dumps({"loaded": bool(loaded), "inputs": list(node.INPUT_TYPES()["required"]) if node else None}))
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
    report = result.stdout.strip().splitlines()[-1]
    assert '"loaded": true' in report and '"mode"' in report, report
