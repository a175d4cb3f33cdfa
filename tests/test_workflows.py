"""The example workflows are well-formed and pass ComfyUI's own prompt validation with the ToDo node in them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from workflow_api import to_api_prompt

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


def test_there_are_example_workflows():
    assert {p.stem for p in WORKFLOWS} >= {
        "sd15_txt2img_2048", "sdxl_txt2img_2048x2048", "sdxl_txt2img_2560x1440", "sdxl_hires_fix_2x",
        "sdxl_deep_shrink_todo_4096", "flux_dev_txt2img_2048", "z_image_turbo_txt2img_2048",
        "flux2_dev_txt2img_2048", "wan22_5b_t2v_1280x704",
    }  # fmt: skip


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_has_a_template_thumbnail(path):
    thumbnail = path.with_suffix(".jpg")  # what ComfyUI's template browser asks for
    assert thumbnail.is_file() and thumbnail.read_bytes()[:3] == b"\xff\xd8\xff"


LOADERS = {"CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders",
           "VAELoader": "vae"}  # fmt: skip
"""Loader node -> the model folder it reads; the file name is its first widget."""


def model_files(workflow: dict) -> set[tuple[str, str]]:
    """(folder, file name) of every model file the workflow's loaders name."""
    return {(LOADERS[n["type"]], n["widgets_values"][0]) for n in workflow["nodes"] if n["type"] in LOADERS}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_explains_itself_and_lists_its_model_files(path):
    workflow = json.loads(path.read_text())
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and "ToDo" in notes[0]["widgets_values"][0]
    listed = {(m["directory"], m["name"]) for m in workflow["models"]}
    assert model_files(workflow) == listed, "the models list names every file a loader reads, and only those"
    for model in workflow["models"]:
        assert model["url"].startswith("https://") and model["url"].split("?")[0].endswith("/" + model["name"])
    for loader in [n for n in workflow["nodes"] if n["type"] in LOADERS]:  # the frontend's missing-model dialog
        folder, name = LOADERS[loader["type"]], loader["widgets_values"][0]
        (model,) = loader["properties"]["models"]
        assert (model["directory"], model["name"]) == (folder, name) and model in workflow["models"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_links_are_consistent(path):
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert (
            nodes[source]["outputs"][source_slot]["type"] == nodes[target]["inputs"][target_slot]["type"] == link_type
        )
    assert any(n["type"] == "ToDoModelPatch" for n in workflow["nodes"])
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])


def api_prompt(path: Path) -> dict:
    import nodes

    return to_api_prompt(json.loads(path.read_text()), nodes.NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def checkpoint_stand_ins(node, tmp_path_factory):
    """Empty files named like the workflows' model files: validation checks names, it never loads them."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    for folder, name in set().union(*(model_files(json.loads(path.read_text())) for path in WORKFLOWS)):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / name).touch()
    for folder in set(LOADERS.values()):
        folder_paths.add_model_folder_path(folder, str(root / folder))


def validate(prompt: dict):
    import execution

    return asyncio.run(execution.validate_prompt("test", prompt, None))


@pytest.mark.comfyui
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_comfyui_validates_the_workflow(checkpoint_stand_ins, path):
    valid, error, outputs, node_errors = validate(api_prompt(path))
    assert valid, (error, node_errors)
    assert outputs


@pytest.mark.comfyui
def test_comfyui_validation_rejects_a_bad_todo_value(checkpoint_stand_ins):
    prompt = api_prompt(WORKFLOWS[0])
    todo = next(entry for entry in prompt.values() if entry["class_type"] == "ToDoModelPatch")
    todo["inputs"]["depth_1_factor"] = 20.0
    valid, _, _, node_errors = validate(prompt)
    assert not valid
    assert "depth_1_factor must be between 1 and 8" in json.dumps(node_errors)


@pytest.mark.comfyui
def test_a_workflow_saved_before_the_dit_inputs_still_validates(checkpoint_stand_ins):
    """Workflows shared before the node gained its DiT inputs (the last ones) load with their defaults."""
    import nodes

    workflow = json.loads(WORKFLOWS[0].read_text())
    todo = next(node for node in workflow["nodes"] if node["type"] == "ToDoModelPatch")
    assert todo["widgets_values"][-2:] == ["all", 1.0]
    todo["widgets_values"] = todo["widgets_values"][:-2]
    prompt = to_api_prompt(workflow, nodes.NODE_CLASS_MAPPINGS)
    inputs = next(e for e in prompt.values() if e["class_type"] == "ToDoModelPatch")["inputs"]
    assert inputs["dit_blocks"] == "all" and inputs["temporal_factor"] == 1.0
    valid, error, _, node_errors = validate(prompt)
    assert valid, (error, node_errors)
