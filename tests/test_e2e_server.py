"""End to end through ComfyUI's own server and HTTP API, as a client uses it (slow: ``-m "not slow"`` skips)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from comfy_server import CHECKPOINT_NAME, PACK_FOLDER, SDXL_CHECKPOINT_NAME, reduced
from workflow_api import to_api_prompt

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
TIMINGS: dict[str, float] = {}


class ObjectInfo:
    @staticmethod
    def node_classes(info: dict) -> dict:
        """``to_api_prompt`` needs ``INPUT_TYPES()``: serve it from /object_info, as a client would."""

        class Remote:
            def __init__(self, entry: dict) -> None:
                self.entry = entry

            def INPUT_TYPES(self) -> dict:  # noqa: N802  (ComfyUI's name)
                return self.entry["input"]

        return {name: Remote(entry) for name, entry in info.items()}


def test_node_is_in_object_info_with_its_inputs(server):
    info = server.get("/object_info/ToDoModelPatch")["ToDoModelPatch"]
    assert info["display_name"] == "ToDo: Token Downsampling"
    assert info["category"] == "model_patches/unet"
    assert list(info["input"]["required"]) == [
        "model", "mode", "depth_1_factor", "depth_2_factor", "depth_3_factor",
        "method", "start_percent", "end_percent", "native_resolution",
    ]  # fmt: skip
    assert list(info["input"]["optional"]) == ["dit_blocks", "temporal_factor", "max_error", "report_error"]
    assert info["python_module"].endswith(PACK_FOLDER)


def test_workflows_are_served_as_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK_FOLDER]) == sorted(p.stem for p in WORKFLOWS)
    first = WORKFLOWS[0]
    served = server.get(f"/api/workflow_templates/{PACK_FOLDER}/{first.name}")
    assert served == json.loads(first.read_text())
    with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{first.stem}.jpg") as thumbnail:
        assert thumbnail.status == 200 and thumbnail.read() == first.with_suffix(".jpg").read_bytes()


ACTING_NATIVE_RESOLUTION = 128
"""The test copies run at 256 px, where auto mode would do nothing for a 512 px model: a lower native size makes
ToDo act (factor 2 at 256 px, 4 at 512 px)."""
SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
TWO_STEP_SAMPLERS = ("uni_pc", "uni_pc_bh2")
"""ComfyUI's UniPC runs at order min(3, steps - 1): at one step the model's output never reaches the result."""


def upstream(prompt: dict, node_id: str) -> set[str]:
    """Every node ``node_id`` takes an input from, transitively (a SamplerCustomAdvanced gets its model through
    its guider)."""
    sources = {value[0] for value in prompt[node_id]["inputs"].values() if isinstance(value, list)}
    return sources.union(*(upstream(prompt, source) for source in sources))


def with_latents_saved(prompt: dict, tag: str) -> dict:
    """Each sampler's latent saved too: random weights and 8-bit PNGs can hide a small change in the image."""
    for node_id in [n for n, entry in prompt.items() if entry["class_type"] in SAMPLERS]:
        prompt[f"{node_id}_latent"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [node_id, 0], "filename_prefix": f"latents/{tag}_{node_id}"},
        }
    return prompt


def latents_only(prompt: dict) -> dict:
    """Only the nodes the saved latents need: a run compared by its latents skips decoding and saving images."""
    saves = [n for n, entry in prompt.items() if entry["class_type"] == "SaveLatent"]
    needed = set(saves).union(*(upstream(prompt, n) for n in saves))
    return {n: entry for n, entry in prompt.items() if n in needed}


def without_todo(prompt: dict) -> dict:
    """The same prompt with every ToDo node taken out and its consumers fed its input model."""
    todo = {n: entry["inputs"]["model"] for n, entry in prompt.items() if entry["class_type"] == "ToDoModelPatch"}
    out = {}
    for node_id, entry in prompt.items():
        if node_id in todo:
            continue
        inputs = {k: todo[v[0]] if isinstance(v, list) and v[0] in todo else v for k, v in entry["inputs"].items()}
        out[node_id] = {**entry, "inputs": inputs}
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_end_to_end_and_todo_acts(server, path):
    # One step: the graph runs twice (with and without ToDo), and one step shows the change.
    prompt = to_api_prompt(json.loads(path.read_text()), ObjectInfo.node_classes(server.get("/object_info")))
    prompt = reduced(prompt, steps=1)
    for entry in prompt.values():
        if entry["inputs"].get("sampler_name") in TWO_STEP_SAMPLERS:
            entry["inputs"]["steps"] = 2
    todo_nodes = [n for n, entry in prompt.items() if entry["class_type"] == "ToDoModelPatch"]
    assert todo_nodes, "every example workflow shows the node"
    for node_id in todo_nodes:
        if prompt[node_id]["inputs"]["mode"] == "auto":
            prompt[node_id]["inputs"]["native_resolution"] = ACTING_NATIVE_RESOLUTION
    start = time.monotonic()
    entry = server.run_prompt(with_latents_saved(json.loads(json.dumps(prompt)), f"{path.stem}_todo"))
    TIMINGS[path.stem] = round(time.monotonic() - start, 1)
    print(f"{path.stem}: {TIMINGS[path.stem]} s")
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images, f"no image or video written: {entry['outputs']}"
    for image in images:
        written = server.base / "output" / image.get("subfolder", "") / image["filename"]
        assert written.is_file() and written.stat().st_size > 1000

    plain = server.run_prompt(latents_only(with_latents_saved(without_todo(prompt), f"{path.stem}_plain")))
    samplers = [n for n, e in prompt.items() if e["class_type"] in SAMPLERS]
    acted = [n for n in samplers if set(todo_nodes) & upstream(prompt, n)]
    assert acted, "a sampler runs on the ToDo model"
    for node_id in acted:
        with_todo = saved_latent(server, entry, f"{node_id}_latent")
        assert torch.isfinite(with_todo).all()
        assert not torch.equal(with_todo, saved_latent(server, plain, f"{node_id}_latent")), (
            f"ToDo did not act in {node_id}"
        )


@pytest.mark.parametrize(("name", "value", "message"), [
    ("depth_1_factor", 0.0, "depth_1_factor must be between 1 and 8"),
    ("method", "foo", "method must be one of"),
])  # fmt: skip
def test_bad_input_is_refused_naming_the_input(server, name, value, message):
    prompt = to_api_prompt(json.loads(WORKFLOWS[0].read_text()), ObjectInfo.node_classes(server.get("/object_info")))
    todo = next(entry for entry in prompt.values() if entry["class_type"] == "ToDoModelPatch")
    todo["inputs"][name] = value
    status, reply = server.post("/prompt", {"prompt": prompt})
    assert status == 400
    assert message in json.dumps(reply["node_errors"])


def branch_prompt(with_todo_branch: bool, checkpoint: str = CHECKPOINT_NAME) -> dict:
    """One checkpoint feeding a plain branch ("plain") and, optionally, a ToDo branch ("todo"), as API prompt."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cabin by a lake", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}},
    }

    def branch(name: str, model: list) -> None:
        prompt[f"{name}_sample"] = {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": 7,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        }
        # The latent, not a PNG: random weights and 8-bit quantisation can hide a small change in the image.
        prompt[f"{name}_save"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"{name}_sample", 0], "filename_prefix": f"latents/{name}"},
        }

    branch("plain", ["ckpt", 0])
    if with_todo_branch:
        prompt["todo"] = {
            "class_type": "ToDoModelPatch",
            "inputs": {
                "model": ["ckpt", 0],
                "mode": "manual",
                "depth_1_factor": 2.0,
                "depth_2_factor": 2.0,
                "depth_3_factor": 1.0,
                "method": "nearest",
                "start_percent": 0.0,
                "end_percent": 1.0,
                "native_resolution": 0,
            },
        }
        branch("todo", ["todo", 0])
    return prompt  # fmt: skip


def saved_latent(server, entry: dict, node_id: str):
    from safetensors.torch import load_file

    (latent,) = entry["outputs"][node_id]["latents"]
    return load_file(str(server.base / "output" / latent.get("subfolder", "") / latent["filename"]))["latent_tensor"]


def cached_nodes(entry: dict) -> set[str]:
    return {node for kind, data in entry["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]}


def test_a_todo_branch_never_leaks_into_a_plain_branch(server):
    alone = server.run_prompt(branch_prompt(with_todo_branch=False))
    # The same random weights under another name: ComfyUI cannot serve the plain branch from its cache (a /free
    # request races with the next prompt: the worker may take the prompt before it clears the cache).
    both = server.run_prompt(branch_prompt(with_todo_branch=True, checkpoint=SDXL_CHECKPOINT_NAME))
    assert "plain_sample" not in cached_nodes(both), "the plain branch must really run again"
    plain = saved_latent(server, alone, "plain_save")
    assert torch.equal(saved_latent(server, both, "plain_save"), plain), "a ToDo branch changed the plain branch"
    assert not torch.equal(saved_latent(server, both, "todo_save"), plain), "the ToDo branch should differ"
