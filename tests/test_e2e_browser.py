"""In a real browser: ComfyUI's own frontend, each example workflow dropped onto the page as a user drops a file,
the ToDo node shown with its widgets, and the graph queued from the page (slow; needs Chromium and Playwright)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from comfy_server import FRAME_NODES, SIZE_NODES, STEP_NODES, TEST_FRAMES, TEST_SIDE

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip

DROP_FILE = """async ([name, text]) => {
    const file = new File([text], name, {type: "application/json"});
    const data = new DataTransfer();
    data.items.add(file);
    const target = document.querySelector("canvas") || document;
    for (const type of ["dragenter", "dragover", "drop"]) {
        target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
    }
}"""

GRAPH_STATE = """() => {
    const graph = window.app.graph;
    const nodes = graph._nodes || graph.nodes;
    const known = (type) => Boolean(window.LiteGraph.registered_node_types[type]);
    const todo = nodes.find((n) => n.type === "ToDoModelPatch");
    return {
        types: nodes.map((n) => n.type),
        unknown: nodes.filter((n) => !known(n.type)).map((n) => n.type),
        todoWidgets: todo ? todo.widgets.map((w) => [w.name, w.value]) : null,
    };
}"""

FOCUS_TODO = """() => {
    const canvas = window.app.canvas;
    const todo = (window.app.graph._nodes || window.app.graph.nodes).find((n) => n.type === "ToDoModelPatch");
    canvas.ds.scale = 1.0;
    canvas.ds.offset = [-todo.pos[0] + 560, -todo.pos[1] + 260];
    canvas.setDirty(true, true);
}"""

LOADED = """(expected) => {
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    return JSON.stringify(nodes.map((n) => n.type).sort()) === JSON.stringify(expected);
}"""

REDUCE_AND_QUEUE = """async ({side, frames, steps, sizeNodes, stepNodes, frameNodes}) => {
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    for (const node of nodes) {
        const widget = (name) => node.widgets && node.widgets.find((w) => w.name === name);
        const multiple = sizeNodes[node.type];
        if (multiple) {
            const scale = side / Math.max(widget("width").value, widget("height").value);
            widget("width").value = Math.max(64, Math.round(widget("width").value * scale / multiple) * multiple);
            widget("height").value = Math.max(64, Math.round(widget("height").value * scale / multiple) * multiple);
        }
        if (stepNodes.includes(node.type)) widget("steps").value = steps;
        if (frameNodes[node.type]) widget(frameNodes[node.type]).value = frames;
    }
    await window.app.queuePrompt(0, 1);
}"""
"""The page's copy of ``comfy_server.reduced``, set through the widgets as a user would."""
REDUCTION = {"side": TEST_SIDE, "frames": TEST_FRAMES, "steps": 2, "sizeNodes": SIZE_NODES,
             "stepNodes": list(STEP_NODES), "frameNodes": FRAME_NODES}  # fmt: skip


@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        pytest.skip("Chromium not found: apt-get install chromium (Debian) to run the browser tests")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run browser tests")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template browser over the graph
        tab = browser.new_page(viewport={"width": 1600, "height": 900})
        tab.goto(server.url)
        tab.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        yield tab
        browser.close()


def save_thumbnail(screenshot: Path, thumbnail: Path) -> None:
    """The template browser's thumbnail (``<workflow>.jpg`` beside the workflow): the graph around the ToDo node."""
    from PIL import Image

    with Image.open(screenshot) as image:
        width, height = image.size
        crop = image.convert("RGB").crop((width // 8, height // 12, width * 7 // 8, height * 11 // 12))
        crop.thumbnail((512, 512))
        crop.save(thumbnail, quality=85)


def finished_prompts(server) -> dict:
    return {key: value for key, value in server.get("/history").items() if value.get("status", {}).get("completed")}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_dropped_workflow_loads_shows_todo_and_runs_from_the_page(server, page, path):
    expected_types = sorted(node["type"] for node in json.loads(path.read_text())["nodes"])
    page.evaluate("() => window.app.graph.clear()")  # so that the previous workflow cannot satisfy the wait
    page.evaluate(DROP_FILE, [path.name, path.read_text()])
    page.wait_for_function(LOADED, arg=expected_types, timeout=30_000)
    state = page.evaluate(GRAPH_STATE)
    assert sorted(state["types"]) == expected_types
    assert state["unknown"] == [], f"nodes reported missing: {state['unknown']}"
    widgets = dict(state["todoWidgets"])
    assert list(widgets) == ["mode", "depth_1_factor", "depth_2_factor", "depth_3_factor", "method",
                             "start_percent", "end_percent", "native_resolution", "dit_blocks",
                             "temporal_factor", "max_error", "report_error"]  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate(FOCUS_TODO)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    save_thumbnail(ARTIFACTS / f"{path.stem}.png", ARTIFACTS / f"{path.stem}.jpg")

    before = set(finished_prompts(server))
    page.evaluate(REDUCE_AND_QUEUE, REDUCTION)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        new = {k: v for k, v in finished_prompts(server).items() if k not in before}
        if new:
            (entry,) = new.values()
            assert entry["status"]["status_str"] == "success", entry["status"]
            assert any(output.get("images") for output in entry["outputs"].values())  # a video is listed there too
            return
        time.sleep(1)
    raise AssertionError(f"the queued workflow did not finish:\n{server.log_tail()}")
