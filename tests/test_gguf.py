"""ToDo on GGUF-quantized diffusion models loaded by the ComfyUI-GGUF pack (city96/ComfyUI-GGUF).

A Flux model (Q8_0 blocks) and an SD1.5 model (Q4_0 blocks, Q4_1 feed-forward outputs, reshaped rows) are
written with the ``gguf`` package's writer the way the pack's tool chain lays them out (``gguf_support``), listed
by the pack's loader from a temporary ``diffusion_models`` folder, loaded by its ``UnetLoaderGGUF`` node and
sampled through ComfyUI's sampler. Each proves: the file round-trips into ComfyUI's own model class; ToDo reduces
the image keys (counted at the attention backend) and leaves the queries; factor 1 is bit-identical to the GGUF
model alone; the pack's ``GGUFModelPatcher`` clones keep ToDo's override or patch and its wrapper; a LoRA on the
quantized weights (which the pack applies at dequantization time) commutes with ToDo and leaves nothing behind.

Where the pack or ``gguf`` cannot be had (no GitHub, no PyPI), every test here is skipped with the reason.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from comfy_support import TEXT_TOKENS as UNET_TEXT_TOKENS
from comfy_support import apply_node, import_comfyui, sample
from dit_support import OVERRIDE_KEY, LazyModels, sample_dit, token_grid, with_probe
from dit_support import TEXT_TOKENS as DIT_TEXT_TOKENS
from gguf_support import FLUX_GGUF, SD15_GGUF, load_gguf_pack, write_gguf
from reference import expected_kv, kept_tokens, unet_grid

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

KINDS = ("flux", "sd15")
QUANT = {"flux": "Q8_0", "sd15": "Q4_0"}
STORED_TYPES = {"flux": {"Q8_0", "F16", "F32"}, "sd15": {"Q4_0", "Q4_1", "F16", "F32"}}
"""Tensor types each file holds: quantized blocks, unquantized embedders and in/out layers, F32 vectors."""
LATENT = {"flux": (10, 14), "sd15": (16, 24)}
"""Flux: a 5 x 7 token grid, which factor 2 does not divide; SD1.5: 16 x 24 and 8 x 12 at its two levels."""
MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 2.0}
MANUAL_OFF = {"mode": "manual", "depth_1_factor": 1.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}
LORA_TARGETS = {
    "flux": ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"),
    "sd15": (
        "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
        "middle_block.1.transformer_blocks.0.ff.net.2.weight",
    ),
}
"""Quantized weights (Q8_0; Q4_0 stored in rows of 256, and Q4_1) that the test LoRA patches."""


@pytest.fixture(scope="module")
def pack(node):
    return load_gguf_pack(import_comfyui())


@pytest.fixture(scope="module")
def unet_folder(pack, tmp_path_factory):
    """A temporary folder registered as ``diffusion_models`` (which the pack's ``unet_gguf`` list shares).

    Taken off the list and emptied afterwards: the Flux file alone is 0.6 GB.
    """
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    yield folder
    paths = folder_paths.folder_names_and_paths["diffusion_models"][0]
    if str(folder) in paths:
        paths.remove(str(folder))
    for name in ("diffusion_models", "unet_gguf"):
        folder_paths.filename_list_cache.pop(name, None)
    for file in folder.glob("*.gguf"):
        file.unlink()


@pytest.fixture(scope="module")
def files(pack, unet_folder):
    """``files[kind]``: (file name, key -> stored type), written on first use."""

    def write(kind: str):
        name = f"todo-test-{kind}-{QUANT[kind]}.gguf"
        stored = write_gguf(pack.gguf, unet_folder / name, kind, getattr(pack.gguf.GGMLQuantizationType, QUANT[kind]))
        return name, stored

    return LazyModels(write)


@pytest.fixture(scope="module")
def models(pack, files):
    """``models[kind]``: the model as the pack's UnetLoaderGGUF node returns it; unloaded from ComfyUI afterwards."""
    import comfy.model_management

    def load(kind: str):
        name, _ = files[kind]
        loader = pack.loader
        assert name in loader.INPUT_TYPES()["required"]["unet_name"][0], "the loader's list misses the file"
        (model,) = getattr(loader(), loader.FUNCTION)(unet_name=name)
        return model

    yield LazyModels(load)
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def renders(models):
    """``renders[kind, inputs]``: (output, probe) of the GGUF model alone (inputs None) or with ToDo, rendered once."""
    return {}


def render(kind: str, model) -> torch.Tensor:
    if kind == "flux":
        return sample_dit(model, *LATENT[kind])
    return sample(model, LATENT[kind])


def expected_pairs(kind: str, factor: float) -> set[tuple[int, int]]:
    """Every (query tokens, key tokens) pair the attention backend should see in one model call."""
    latent_hw = LATENT[kind]
    if kind == "flux":  # joint attention in the double and the single block: text first, all of it kept
        height, width = token_grid(*latent_hw)
        return {(DIT_TEXT_TOKENS + height * width, DIT_TEXT_TOKENS + kept_tokens(height, width, factor))}
    pairs = set()
    for depth in (1, 2):  # self-attention reduced per level, cross-attention to the text never
        grid = unet_grid(latent_hw, depth)
        tokens = grid[0] * grid[1]
        pairs |= {(tokens, expected_kv(latent_hw, grid, (factor,) * 3)), (tokens, UNET_TEXT_TOKENS)}
    return pairs


def probed_render(node, kind: str, model, inputs: dict | None, then=None):
    """Render ``model`` with a probe registered first, then ToDo with ``inputs`` (if any), then ``then`` (if any)."""
    probed, probe = with_probe(model)
    patched = apply_node(node, probed, **inputs) if inputs is not None else probed
    if then is not None:
        patched = then(patched)
    return render(kind, patched), probe


def cached(renders, node, models, kind: str, name: str, inputs: dict | None):
    if (kind, name) not in renders:
        renders[kind, name] = probed_render(node, kind, models[kind], inputs)
    return renders[kind, name]


def pairs(probe) -> set[tuple[int, int]]:
    return {(call.q_tokens, call.kv_tokens) for call in probe.calls}


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comfyui_todo" and r.levelno >= logging.WARNING]


def lora_for(model, kind: str, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA state dict for the quantized weights in ``LORA_TARGETS``, names checked with ComfyUI."""
    import comfy.lora
    import comfy.utils

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for target in LORA_TARGETS[kind]:
        key = f"diffusion_model.{target}"
        name = "lora_unet_" + target.removesuffix(".weight").replace(".", "_")
        assert key_map[name] == key
        out_features, in_features = comfy.utils.get_attr(model.model, key).shape[:2]
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        lora[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def with_lora(model, lora: dict):
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert len(patched.patches) == len(lora) // 3, "the LoRA missed a weight"
    return patched


# --- the files and the loader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_written_file_loads_as_comfyuis_own_model_with_quantized_weights(pack, files, models, kind):
    import comfy.model_base

    model = models[kind]
    assert type(model) is pack.patcher_class
    expected_class, config = (
        (comfy.model_base.Flux, FLUX_GGUF) if kind == "flux" else (comfy.model_base.BaseModel, SD15_GGUF)
    )
    assert type(model.model) is expected_class
    detected = model.model.model_config.unet_config
    assert {key: detected[key] for key in config} == config, "ComfyUI detected other shapes than were written"
    _, stored = files[kind]
    assert set(stored.values()) == STORED_TYPES[kind]
    loaded = {
        getattr(getattr(parameter, "tensor_type", None), "name", None)
        for parameter in model.model.diffusion_model.parameters()
    }
    assert {"F16", QUANT[kind]} <= loaded, f"the loaded weights are {loaded}, not the file's quantized tensors"
    for target in LORA_TARGETS[kind]:
        assert stored[target].startswith("Q4" if kind == "sd15" else "Q8"), target


# --- ToDo on the GGUF model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_todo_reduces_image_keys_and_factor_one_is_bit_identical(node, models, renders, kind, caplog):
    alone, alone_probe = cached(renders, node, models, kind, "alone", None)
    assert pairs(alone_probe) == expected_pairs(kind, 1)
    assert torch.isfinite(alone).all()

    off, _ = probed_render(node, kind, models[kind], MANUAL_OFF)
    assert torch.equal(off, alone), "ToDo at factor 1 changed the GGUF model's output"

    reduced, probe = cached(renders, node, models, kind, "todo", MANUAL_2)
    assert pairs(probe) == expected_pairs(kind, 2)
    assert len(probe.calls) == len(alone_probe.calls)
    assert reduced.shape == alone.shape and torch.isfinite(reduced).all()
    assert not torch.equal(reduced, alone)
    assert todo_warnings(caplog) == []


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_model_patcher_clones_keep_todo(node, pack, models, renders, kind):
    todo = sys.modules[node.__module__]  # the classes as ComfyUI's loader imported them
    model = models[kind]
    patched = apply_node(node, model, **MANUAL_2)
    clone = patched.clone()
    for copy_ in (patched, clone):
        assert type(copy_) is pack.patcher_class, "ToDo or a clone lost the pack's ModelPatcher subclass"
        assert copy_.patch_on_device == model.patch_on_device
        assert "comfyui_todo" in copy_.wrappers["apply_model"], "the clone lost ToDo's apply-model wrapper"
        options = copy_.model_options["transformer_options"]
        if kind == "flux":
            assert isinstance(options[OVERRIDE_KEY], todo.ToDoAttentionOverride)
        else:
            assert any(isinstance(p, todo.ToDoAttn1Patch) for p in options["patches"]["attn1_patch"])
    assert OVERRIDE_KEY not in model.model_options.get("transformer_options", {})

    # A clone of a clone of the ToDo model renders exactly what the ToDo model renders.
    reduced, reduced_probe = cached(renders, node, models, kind, "todo", MANUAL_2)
    out, probe = probed_render(node, kind, model, MANUAL_2, then=lambda m: m.clone().clone())
    assert pairs(probe) == pairs(reduced_probe) == expected_pairs(kind, 2)
    assert torch.equal(out, reduced)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_quantized_weights_commutes_with_todo_and_leaves_nothing_behind(node, pack, models, renders, kind):
    model = models[kind]
    lora = lora_for(model, kind)
    reduced, _ = cached(renders, node, models, kind, "todo", MANUAL_2)

    lora_then_todo, probe_a = probed_render(node, kind, with_lora(model, lora), MANUAL_2)
    todo_then_lora, probe_b = probed_render(node, kind, model, MANUAL_2, then=lambda m: with_lora(m, lora))
    assert pairs(probe_a) == pairs(probe_b) == expected_pairs(kind, 2)
    assert torch.isfinite(lora_then_todo).all()
    assert torch.equal(lora_then_todo, todo_then_lora), "weight patches and ToDo commute"
    assert not torch.equal(lora_then_todo, reduced), "the LoRA did not act on the quantized weights"

    # The pack hangs the LoRA on the shared model's quantized weights: the next render without it must be clean.
    alone, _ = cached(renders, node, models, kind, "alone", None)
    again, _ = probed_render(node, kind, model, None)
    assert torch.equal(again, alone), "the LoRA's patches stayed on the GGUF model"
