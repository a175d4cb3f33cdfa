"""Finding and driving a real ComfyUI for the integration tests.

ComfyUI is looked for in ``COMFYUI_PATH``, then ``~/comfy/ComfyUI`` (comfy-cli's
default workspace), then as the ComfyUI this pack sits in (``custom_nodes/``); where
none is found, the tested v0.8.0 tree shipped in ``../shared/hosts`` is unpacked into
a cache folder. Only without that archive, or without ComfyUI's requirements, are
the tests that need it skipped, with a reason that says how to enable them; under
CI (``CI=true``) a ComfyUI that cannot be imported fails them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from todo_core.bench.comfyui_path import ENABLE_HINT, PACK_ROOT, ensure_comfyui

TEXT_TOKENS = 7
"""Length of the random text context: the K/V count of cross-attention calls."""


_import_error: str | None = None


def import_comfyui() -> Path:
    """Put ComfyUI first on sys.path, force the CPU, import its core; skip the test if impossible."""
    global _import_error
    root = ensure_comfyui()
    if root is None:
        _unavailable(f"ComfyUI not found: {ENABLE_HINT}")
    if _import_error is not None:
        _unavailable(_import_error)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        importlib.import_module("comfy.model_management")
        importlib.import_module("comfy.model_patcher")
        importlib.import_module("comfy.sample")
        importlib.import_module("nodes")
    except ImportError as error:
        _import_error = f"ComfyUI at {root} cannot be imported ({error}): {ENABLE_HINT}"
        _unavailable(_import_error)
    return root


def _unavailable(reason: str) -> None:
    """Skip a ComfyUI test on a developer's machine; fail it in CI, where every ComfyUI test must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def load_pack():
    """Load this pack through ComfyUI's own custom-node loader; return the ToDoModelPatch class."""
    import nodes

    if "PatchModelAddDownscale" not in nodes.NODE_CLASS_MAPPINGS:  # ComfyUI's own extra nodes, as the server has
        asyncio.run(nodes.init_builtin_extra_nodes())
    if "ToDoModelPatch" not in nodes.NODE_CLASS_MAPPINGS:
        loaded = asyncio.run(nodes.load_custom_node(str(PACK_ROOT), module_parent="custom_nodes"))
        assert loaded, "ComfyUI's loader refused the pack"
    return nodes.NODE_CLASS_MAPPINGS["ToDoModelPatch"]


# Tiny UNets with the real depth structure of SD1.5 and SDXL, few channels.
SD15_TINY = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1, 1],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "adm_in_channels": None,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
SDXL_TINY = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "num_heads": -1,
    "num_head_channels": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


CPU = torch.device("cpu")


@contextlib.contextmanager
def empty_memory_is_nan():
    """``torch.empty`` fills floating tensors with NaN while a model is built.

    Memory that a model class allocates and never writes (SD3's ``pos_embed`` buffer) otherwise holds whatever
    was there before: usually zeros, sometimes garbage, so a test may pass or fail by chance. Poisoned, such
    memory is always found, and :func:`random_patcher` initialises it.
    """
    original = torch.empty

    def poisoned(*args, **kwargs):
        tensor = original(*args, **kwargs)
        if tensor.is_floating_point() and tensor.device.type != "meta":
            with torch.no_grad():
                tensor.fill_(float("nan"))
        return tensor

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = original


def random_patcher(
    config_class,
    model_class,
    unet: dict,
    dtype=torch.float32,
    device=CPU,
    seed: int = 0,
    check_render: bool = True,
    **after,
):
    """A ModelPatcher around ``model_class`` built from ``unet`` with seeded random weights.

    ``after`` overrides the config's own extras (head width) so that narrow
    channels still give whole heads. On the ``meta`` device only shapes exist.
    Every parameter is drawn; every floating buffer of the diffusion model that
    its class leaves uninitialised is drawn too (seeded), while the buffers a
    class computes (and ``model_sampling``'s schedule) are kept. The model is
    then checked: every tensor finite and, unless ``check_render`` is False, a
    plain render at a small size finite (:func:`plain_render`).
    """
    import comfy.model_patcher

    config = config_class({**unet, "dtype": dtype})
    config.set_inference_dtype(dtype, None)
    config.unet_config.update(after)
    torch.manual_seed(seed)
    if device.type == "meta":
        model = model_class(config, device=device)
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    with empty_memory_is_nan():
        model = model_class(config, device=device)
    with torch.no_grad():
        for parameter in model.diffusion_model.parameters():  # zero-initialised out layers would hide everything
            parameter.normal_(0.0, 0.05)
        generator = torch.Generator().manual_seed(seed)
        for _, buffer in sorted(model.diffusion_model.named_buffers()):
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)
    for name, buffer in model.named_buffers():  # parameters are all drawn; buffers outside diffusion_model kept
        assert not buffer.is_floating_point() or torch.isfinite(buffer).all(), f"buffer {name} is not finite"
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    if check_render:
        out = plain_render(patcher)
        assert out is None or torch.isfinite(out).all(), f"a plain render of {model_class.__name__} is not finite"
    return patcher


def plain_render(patcher) -> torch.Tensor | None:
    """One sampler step of the unpatched model at a small size; None for a model it cannot condition.

    Tests compare renders with and without ToDo: a model whose plain render is
    not finite would make every such comparison meaningless.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    diffusion_model = patcher.model.diffusion_model
    with torch.random.fork_rng(devices=[]):
        if isinstance(diffusion_model, UNetModel):
            unet = patcher.model.model_config.unet_config
            if unet.get("in_channels") != 4 or unet.get("use_temporal_attention"):
                return None  # inpainting and video UNets need their own conditioning
            return sample(patcher, (8, 8))
        from dit_support import sample_dit  # DiTs: dit_support builds on this module

        return sample_dit(patcher, 8, 8)


def tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-weight SD1.5- or SDXL-shaped UNet in a ModelPatcher, on the CPU."""
    import comfy.model_base
    import comfy.supported_models

    if kind == "sd15":
        return random_patcher(
            comfy.supported_models.SD15, comfy.model_base.BaseModel, {**SD15_TINY, **overrides}, dtype, seed=seed
        )
    return random_patcher(
        comfy.supported_models.SDXL, comfy.model_base.SDXL, {**SDXL_TINY, **overrides}, dtype, seed=seed
    )


@dataclass
class AttentionCall:
    block: tuple
    grid: tuple[int, int]
    q_tokens: int
    kv_tokens: int
    q_batch: int = 0
    kv_batch: int = 0
    """More query than key batches: a patch tiled the queries (HyperTile), each tile attending to a chunk of K/V."""


@dataclass
class Probe:
    """ComfyUI's attention override, used as a probe: records what the attention backend really computes.

    It sees the projected q/k/v after every attn1 patch ran (in whatever order),
    so it measures the K/V tokens that cost time, not what some patch intended.
    Self- and cross-attention calls are both recorded; cross-attention has the
    text context's token count as ``kv_tokens``.
    """

    passes_attention_masks = True  # it hands every mask to the backend: ToDo's correction stays a mask

    calls: list[AttentionCall] = field(default_factory=list)
    compute: bool = True
    """False skips the attention itself (zeros out): token counting at sizes too big to compute on a CPU."""

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        grid = tuple(options.get("activations_shape", (0, 0))[-2:])
        self.calls.append(AttentionCall(options.get("block"), grid, q.shape[1], k.shape[1], q.shape[0], k.shape[0]))
        assert k.shape == v.shape
        if not self.compute:
            return torch.zeros_like(q)
        return attention(q, k, v, *args, **kwargs)

    def self_attention(self, text_tokens: int = TEXT_TOKENS) -> list[AttentionCall]:
        return [c for c in self.calls if c.kv_tokens != text_tokens]

    def kv_by_grid(self) -> dict[tuple[int, int], set[int]]:
        """K/V token counts of self-attention, per activation grid."""
        out: dict[tuple[int, int], set[int]] = {}
        for call in self.self_attention():
            out.setdefault(call.grid, set()).add(call.kv_tokens)
        return out


def forward(
    patcher, latent_hw: tuple[int, int], batch: int = 2, sigma: float = 1.0, seed: int = 0, probe: Probe | None = None
) -> torch.Tensor:
    """One UNet evaluation through ComfyUI's apply_model with the patcher's options and wrappers."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *latent_hw, generator=generator)
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    context = torch.randn(batch, TEXT_TOKENS, context_dim, generator=generator)
    sigmas = torch.full((batch,), sigma)
    options = dict(patcher.model_options["transformer_options"])
    options["sigmas"] = sigmas
    options["wrappers"] = patcher.wrappers  # as the sampler's prepare_model_patcher hands them over
    if probe is not None:
        options["optimized_attention_override"] = probe
    kwargs = {}
    if patcher.model.adm_channels:
        kwargs["y"] = torch.randn(batch, patcher.model.adm_channels, generator=generator)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options, **kwargs)


def sample(patcher, latent_hw: tuple[int, int], steps: int = 1, cfg: float = 7.0, seed: int = 0) -> torch.Tensor:
    """A real ComfyUI sampler run (Euler, CFG) on random conditioning."""
    import comfy.sample

    generator = torch.Generator().manual_seed(seed)
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    extra = {}
    if patcher.model.adm_channels:
        extra = {"pooled_output": torch.randn(1, 1280, generator=generator)}
    positive = [[torch.randn(1, 7, context_dim, generator=generator), dict(extra)]]
    negative = [[torch.randn(1, 7, context_dim, generator=generator), dict(extra)]]
    latent = torch.zeros(1, 4, *latent_hw)
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(
        patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
    )


def apply_node(node_class, model, **inputs):
    """Run a V3 node's execute and return its MODEL output."""
    output = node_class.execute(model, **inputs)
    return output.result[0] if hasattr(output, "result") else output[0]


def run_node(node_id: str, module: str, model, **inputs):
    node_class = getattr(importlib.import_module(module), node_id)
    return apply_node(node_class, model, **inputs)
