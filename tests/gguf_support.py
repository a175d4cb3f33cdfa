"""The ComfyUI-GGUF pack (city96/ComfyUI-GGUF) and tiny GGUF diffusion models written for it.

The pack is looked for in ``GGUF_PACK_PATH`` (only there, where it is set), else as ``custom_nodes/ComfyUI-GGUF``
of the ComfyUI the tests use, then in the pack cache (``$COMFYUI_TODO_CACHE/packs/ComfyUI-GGUF``, by default under
``~/.cache/comfyui-todo``); where none is found it is cloned from GitHub into that cache. The ``gguf`` package (the
pack's one requirement, and the writer of the test models) is imported, else installed with pip. Where either
cannot be had the GGUF tests are skipped with the reason, under CI as well: the pack is a third-party download,
never shipped with this one.

The models are written the way the pack's own tool chain lays them out (its ``tools/convert.py`` and the patched
llama.cpp quantizer): keys without the ``model.diffusion_model.`` prefix, ``general.architecture`` set to the
pack's arch name, one-dimensional and tiny tensors in F32, embedders and in/out layers left unquantized, the block
weights quantized; SD1.x tensors whose last side is not a multiple of 256 are reshaped to rows of 256 with their
shape in ``comfy.gguf.orig_shape.<key>``. Shapes come from ComfyUI's own model classes built on the ``meta``
device, so the loader's architecture detection is what proves the layout right.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from comfy_support import SD15_TINY

logger = logging.getLogger("comfyui_todo.tests")

PACK_NAME = "ComfyUI-GGUF"
PACK_URL = "https://github.com/city96/ComfyUI-GGUF"
CLONE_TIMEOUT_S = 120
PIP_TIMEOUT_S = 300
LOADER_NODE = "UnetLoaderGGUF"
ADVANCED_LOADER_NODE = "UnetLoaderGGUFAdvanced"

QUANTIZATION_THRESHOLD = 1024
"""Tensors of at most this many elements stay F32 (the pack's convert tool)."""
REARRANGE_BLOCK = 256
"""SD1.x/SDXL tensors are reshaped to rows of this many elements when their last side does not divide by it."""
REARRANGE_THRESHOLD = 512
"""... and when they have at least this many elements."""

FLUX_GGUF = {
    # The widths ComfyUI's Flux detection assumes (24 heads of 128 channels, axes 16 + 56 + 56): a GGUF file
    # carries no config, so only the depth and the embedder inputs may be small.
    "image_model": "flux",
    "guidance_embed": True,
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 24,
    "context_in_dim": 32,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "txt_ids_dims": [],
}
SD15_GGUF = {
    # SD1.5's widths (320 channels, 768-wide context, 8 heads), which ComfyUI's SD1.5 detection requires, at two
    # levels with one res block each instead of four levels with two.
    **SD15_TINY,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
}

UNQUANTIZED = {
    # Name parts the patched llama.cpp quantizer leaves in the source precision, per arch.
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "sd1": ("time_embed.", "label_emb.", "input_blocks.0.0.weight", "out.2.weight"),
}
FFN_DOWN = (".ff.net.2.weight",)
"""Feed-forward out layers: a Q4_0 file stores them as Q4_1 (the quantizer's ffn_down rule)."""


# --- finding the pack and the gguf package --------------------------------------------------------------------------


def pack_cache_dir() -> Path:
    """Where the pack is cloned: ``$COMFYUI_TODO_CACHE/packs/ComfyUI-GGUF`` or ``~/.cache/comfyui-todo/packs/...``."""
    base = os.environ.get("COMFYUI_TODO_CACHE") or Path.home() / ".cache" / "comfyui-todo"
    return Path(base).expanduser() / "packs" / PACK_NAME


def is_pack(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("__init__.py", "nodes.py", "loader.py", "ops.py"))


def pack_candidates(comfyui: Path) -> list[Path]:
    """Where an installed pack may be, in order: ``GGUF_PACK_PATH`` alone where set, else the host's custom_nodes,
    then the cache."""
    if os.environ.get("GGUF_PACK_PATH"):
        return [Path(os.environ["GGUF_PACK_PATH"]).expanduser()]
    return [comfyui / "custom_nodes" / PACK_NAME, pack_cache_dir()]


def find_or_clone_pack(comfyui: Path) -> tuple[Path | None, str]:
    """The pack's folder, cloned into the cache if found nowhere; else ``None`` and why.

    A ``GGUF_PACK_PATH`` that is not a checkout is reported, never silently replaced by another copy. The clone
    goes into a temporary sibling renamed into place, so an interrupted one never looks like a checkout.
    """
    found = next((folder for folder in pack_candidates(comfyui) if is_pack(folder)), None)
    if found is not None:
        return found.resolve(), ""
    if os.environ.get("GGUF_PACK_PATH"):
        return None, f"GGUF_PACK_PATH={os.environ['GGUF_PACK_PATH']} is not a {PACK_NAME} checkout"
    target = pack_cache_dir()
    if target.exists():
        return None, f"{target} exists but is not a {PACK_NAME} checkout: remove it to clone again"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{PACK_NAME}-", dir=target.parent))
    command = ["git", "clone", "--quiet", "--depth", "1", PACK_URL, str(staging / PACK_NAME)]
    environment = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # fail, never ask for credentials
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CLONE_TIMEOUT_S, env=environment)
        if result.returncode != 0 or not is_pack(staging / PACK_NAME):
            return None, f"cloning {PACK_URL} failed: {result.stderr.strip()[-300:] or result.returncode}"
        (staging / PACK_NAME).rename(target)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"cloning {PACK_URL} failed ({type(error).__name__}: {error})"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Cloned %s into %s", PACK_URL, target)
    return target.resolve(), ""


def import_gguf() -> tuple[object | None, str]:
    """The ``gguf`` package, installed with pip where it is missing; else ``None`` and why."""
    try:
        return importlib.import_module("gguf"), ""
    except ImportError:
        pass
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "gguf"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"pip install gguf failed ({type(error).__name__}: {error})"
    if result.returncode != 0:
        return None, f"pip install gguf failed: {result.stderr.strip()[-300:]}"
    importlib.invalidate_caches()
    try:
        return importlib.import_module("gguf"), ""
    except ImportError as error:
        return None, f"gguf installed but not importable: {error}"


@dataclass
class GGUFPack:
    """The loaded pack: its folder, its loader nodes and its ModelPatcher subclass."""

    folder: Path
    loader: type
    advanced_loader: type
    patcher_class: type
    gguf: object


_pack: GGUFPack | None = None
_pack_error: str | None = None


def load_gguf_pack(comfyui: Path) -> GGUFPack:
    """The pack loaded through ComfyUI's own custom-node loader; ``pytest.skip`` with the reason where impossible.

    A plain skip even under CI: the pack and ``gguf`` are downloads this project never ships, so a machine
    without GitHub (or PyPI) cannot have them.
    """
    global _pack, _pack_error
    if _pack is not None:
        return _pack
    if _pack_error is None:
        _pack_error = _load(comfyui)
    if _pack is None:
        pytest.skip(f"{PACK_NAME} unavailable: {_pack_error} (set GGUF_PACK_PATH to a checkout of {PACK_URL})")
    return _pack


def _load(comfyui: Path) -> str:
    """Find, fetch and load the pack into ``_pack``; return why not (empty when loaded)."""
    global _pack
    gguf, why = import_gguf()
    if gguf is None:
        return why
    folder, why = find_or_clone_pack(comfyui)
    if folder is None:
        return why
    import nodes

    if LOADER_NODE not in nodes.NODE_CLASS_MAPPINGS:
        loaded = asyncio.run(nodes.load_custom_node(str(folder), module_parent="custom_nodes"))
        if not loaded or LOADER_NODE not in nodes.NODE_CLASS_MAPPINGS:
            return f"ComfyUI's loader could not load {folder} (see the log above)"
    loader = nodes.NODE_CLASS_MAPPINGS[LOADER_NODE]
    patcher_class = sys.modules[loader.__module__].GGUFModelPatcher
    _pack = GGUFPack(folder, loader, nodes.NODE_CLASS_MAPPINGS[ADVANCED_LOADER_NODE], patcher_class, gguf)
    return ""


# --- writing GGUF models --------------------------------------------------------------------------------------------


def model_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the diffusion model ``kind`` (flux, sd15), from ComfyUI's own classes on the meta device."""
    import comfy.model_base
    import comfy.supported_models
    from comfy_support import random_patcher

    meta = torch.device("meta")
    if kind == "flux":
        patcher = random_patcher(comfy.supported_models.Flux, comfy.model_base.Flux, dict(FLUX_GGUF), device=meta)
    elif kind == "sd15":
        patcher = random_patcher(comfy.supported_models.SD15, comfy.model_base.BaseModel, dict(SD15_GGUF), device=meta)
    else:
        raise ValueError(kind)
    return {key: tuple(tensor.shape) for key, tensor in patcher.model.diffusion_model.state_dict().items()}


ARCH = {"flux": "flux", "sd15": "sd1"}


def tensor_type(gguf, arch: str, key: str, shape: tuple[int, ...], quant):
    """The type the pack's tool chain gives ``key`` in a file of type ``quant`` from a full-precision source."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or math.prod(shape) <= QUANTIZATION_THRESHOLD:
        return types.F32
    if any(part in key for part in UNQUANTIZED[arch]):
        return types.F16
    if quant == types.Q4_0 and key.endswith(FFN_DOWN):
        return types.Q4_1
    return quant


def write_gguf(gguf, path: Path, kind: str, quant, seed: int = 0) -> dict[str, str]:
    """Write a random-weight ``kind`` model as a GGUF file of type ``quant``; return key -> stored type name.

    Weights are ``normal(0, 1 / sqrt(fan_in))`` (activations stay of order one through 3072-wide layers), biases
    and norm scales ``normal(0, 0.05)`` around 0 and 1. A tensor whose rows do not split into whole blocks of its
    type falls back to F16, as in the pack's convert tool.
    """
    arch = ARCH[kind]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.name}"))
    generator = torch.Generator().manual_seed(seed)
    stored: dict[str, str] = {}
    for key, shape in sorted(model_shapes(kind).items()):
        data = torch.randn(shape, generator=generator)
        if len(shape) == 1:
            data = data * 0.05 + (1.0 if key.endswith(".scale") or "norm" in key else 0.0)
        else:
            data = data / math.sqrt(math.prod(shape[1:]))
        array = data.numpy()
        qtype = tensor_type(gguf, arch, key, shape, quant)
        if (
            arch == "sd1"
            and len(shape) > 1
            and array.size >= REARRANGE_THRESHOLD
            and array.size % REARRANGE_BLOCK == 0
            and shape[-1] % REARRANGE_BLOCK != 0
        ):
            array = array.reshape(-1, REARRANGE_BLOCK)
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(side) for side in shape])
        try:
            packed = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(array, qtype)
        writer.add_tensor(key, packed, raw_dtype=qtype)
        stored[key] = qtype.name
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
