"""A real ComfyUI server for end-to-end tests: its own base directory, this pack in custom_nodes, a
random-weight SD1.5 checkpoint and small random stand-ins for the DiT workflows' split model files
(``dit_stand_ins.py``), driven only through the HTTP API a client uses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.comfyui_level import FULL_UNETS
from todo_core.bench.comfyui_path import PACK_ROOT

CHECKPOINT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"
"""The name the example workflows use: the stand-in is found where the real one would be."""
SDXL_CHECKPOINT_NAME = "sd_xl_base_1.0.safetensors"
FLUX_CHECKPOINT_NAME = "flux1-dev-fp8.safetensors"
STAND_IN_NAMES = (CHECKPOINT_NAME, SDXL_CHECKPOINT_NAME, FLUX_CHECKPOINT_NAME)
"""Every checkpoint name the example workflows use; the random SD1.5 checkpoint stands in for each (ComfyUI resizes
the Flux workflow's empty 16-channel latent to the checkpoint's 4 channels), so the graphs run, not the real models."""
PACK_FOLDER = "comfyui-todo"
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache",
                                     "bench-results", "*.pyc")  # fmt: skip
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip


def _fill_random(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            state[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.float16)
    return state


def write_random_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A full SD1.5 checkpoint (UNet, CLIP-L, VAE) with seeded random fp16 weights, as CheckpointLoaderSimple
    loads it. About 2 GB; written once and reused."""
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    if path.exists():
        return path
    generator = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.SD15({**FULL_UNETS["sd15"], "dtype": torch.float16})
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    unet = _fill_random(model.diffusion_model, generator)
    clip = _fill_random(comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16), generator)
    vae = _fill_random(AutoencoderKL(ddconfig=SD_VAE, embed_dim=4), generator)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    state.update(config.process_clip_state_dict_for_saving(clip))
    state.update(config.process_vae_state_dict_for_saving(vae))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
    partial.rename(path)
    return path


TEST_SIDE = 256
"""Longest side the workflows are reduced to in tests: the graph is the same, the CPU time is not."""
TEST_FRAMES = 5
"""Video length in tests: two latent frames for Wan (four frames per latent frame after the first)."""
SIZE_NODES = {"EmptyLatentImage": 8, "EmptySD3LatentImage": 16, "EmptyFlux2LatentImage": 16, "Flux2Scheduler": 16,
              "Wan22ImageToVideoLatent": 32}  # fmt: skip
"""Nodes whose ``width``/``height`` set the render size, with the multiple each takes (Flux2Scheduler's sigma
shift follows the size, so it is reduced as its latent is)."""
STEP_NODES = ("KSampler", "Flux2Scheduler")
"""Nodes whose ``steps`` input sets the sampler's step count."""
FRAME_NODES = {"Wan22ImageToVideoLatent": "length"}


def reduced(prompt: dict, steps: int = 2) -> dict:
    """An API prompt at TEST_SIDE px, TEST_FRAMES frames and ``steps`` steps: same nodes and links, a CPU-sized
    run."""
    for entry in prompt.values():
        inputs, kind = entry["inputs"], entry["class_type"]
        if kind in SIZE_NODES:
            multiple = SIZE_NODES[kind]
            scale = TEST_SIDE / max(inputs["width"], inputs["height"])
            inputs["width"] = max(64, round(inputs["width"] * scale / multiple) * multiple)
            inputs["height"] = max(64, round(inputs["height"] * scale / multiple) * multiple)
        if kind in STEP_NODES:
            inputs["steps"] = steps
        if kind in FRAME_NODES:
            inputs[FRAME_NODES[kind]] = TEST_FRAMES
    return prompt


def checkpoint_cache() -> Path:
    """Where the 2 GB random checkpoint and the DiT stand-ins (0.5 GB) are kept between runs (TODO_TEST_CACHE
    overrides)."""
    return Path(os.environ.get("TODO_TEST_CACHE", Path.home() / ".cache" / "comfyui-todo-tests"))


def _json_or_none(body: bytes) -> object:
    return json.loads(body) if body.strip() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """Client for one running server: JSON over HTTP on the loopback interface only."""

    def __init__(self, url: str, base: Path, log: Path) -> None:
        self.url, self.base, self.log = url, base, log

    def get(self, route: str) -> object:
        with urllib.request.urlopen(f"{self.url}{route}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: object) -> tuple[int, object]:
        request = urllib.request.Request(f"{self.url}{route}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, _json_or_none(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _json_or_none(error.read())

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API prompt and wait for its history entry; raises with the server log tail on failure."""
        status, reply = self.post("/prompt", {"prompt": prompt, "client_id": "todo-e2e"})
        if status != 200:
            raise AssertionError(f"/prompt refused the workflow ({status}): {reply}")
        prompt_id = reply["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                if entry.get("status", {}).get("status_str") == "error":
                    raise AssertionError(f"prompt failed: {entry['status']}\n{self.log_tail()}")
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


STAND_IN_LOADER = Path(__file__).with_name("stand_in_loader.py")
"""The test server's custom node that lets UNETLoader load the small DiT stand-ins (see ``dit_stand_ins.py``)."""


def _link_models(base: Path, folder: str, files: dict[str, Path]) -> None:
    target = base / "models" / folder
    target.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        with contextlib.suppress(FileExistsError):
            (target / name).symlink_to(source)


@contextlib.contextmanager
def comfy_server(comfyui: Path, base: Path, checkpoints: dict[str, Path], startup_timeout: float = 180,
                 model_files: dict[str, dict[str, Path]] | None = None) -> Iterator[ComfyServer]:  # fmt: skip
    """Start ``main.py`` on a free loopback port with its own base directory; always shut it down.

    ``checkpoints`` go to ``models/checkpoints``; ``model_files`` (folder -> {name: file}) to the other model
    folders, by default the DiT workflows' stand-ins (written into the test cache on first use)."""
    from dit_stand_ins import write_stand_ins

    shutil.copytree(PACK_ROOT, base / "custom_nodes" / PACK_FOLDER, ignore=COPY_IGNORE, dirs_exist_ok=True)
    shutil.copy(STAND_IN_LOADER, base / "custom_nodes" / "todo_test_stand_in_loader.py")
    _link_models(base, "checkpoints", checkpoints)
    if model_files is None:
        model_files = write_stand_ins(checkpoint_cache()).folders
    for folder, files in model_files.items():
        _link_models(base, folder, files)
    port = free_port()
    log = base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch", "--use-pytorch-cross-attention"]  # fmt: skip
    with log.open("w") as log_file:
        process = subprocess.Popen(command, cwd=comfyui, stdout=log_file, stderr=subprocess.STDOUT)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{server.log_tail()}")
            with contextlib.suppress(OSError):
                server.get("/system_stats")
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer in {startup_timeout} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
