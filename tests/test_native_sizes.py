"""Auto mode leaves every DiT untouched at the size it was trained at, whatever its VAE and patch size.

Pixels per token come from the model (its latent format's VAE downscale times
its patch size), the native size from its config: Flux.2's latent is 1/16 of
the image with patch 1, Wan 2.2 5B's VAE is 16x too, Wan 14B trains at
1280x720 where Wan 1.3B trains at 832x480.
"""

from __future__ import annotations

import math

import pytest
import torch
from comfy_support import apply_node, import_comfyui, random_patcher
from dit_support import CONTEXT_DIM, FLUX_TINY, QWEN_TINY, SD3_TINY, WAN_TINY, with_probe

pytestmark = pytest.mark.comfyui

META = torch.device("meta")
FLUX2_TINY = {
    **FLUX_TINY,
    "image_model": "flux2",
    "in_channels": 128,
    "out_channels": 128,
    "vec_in_dim": None,
    "guidance_embed": True,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 8, 8, 8],
    "theta": 2000,
    "patch_size": 1,
    "qkv_bias": False,
    "global_modulation": True,
    "mlp_silu_act": True,
    "ops_bias": False,
    "default_ref_method": "index",
    "ref_index_scale": 10.0,
    "txt_ids_dims": [3],
}
WAN22_5B_TINY = {**WAN_TINY, "in_dim": 48, "out_dim": 48}
FLUX2_TEXT = 512
"""Flux.2 pads its text to at least 512 tokens."""


def classes(kind: str):
    import comfy.model_base
    import comfy.supported_models as sm

    return {
        "flux2": (sm.Flux2, comfy.model_base.Flux2),
        "wan22_5b": (sm.WAN22_T2V, comfy.model_base.WAN22),
        "wan21": (sm.WAN21_T2V, comfy.model_base.WAN21),
        "flux": (sm.Flux, comfy.model_base.Flux),
        "qwen_image": (sm.QwenImage, comfy.model_base.QwenImage),
        "sd3": (sm.SD3, comfy.model_base.SD3),
    }[kind]


def wan_config(dim: int, out_dim: int = 16, in_dim: int = 16) -> dict:
    return {**WAN_TINY, "dim": dim, "num_heads": dim // 128, "ffn_dim": 2 * dim, "num_layers": 1,
            "in_dim": in_dim, "out_dim": out_dim}  # fmt: skip


def native_tokens_by_hand(width: int, height: int, pixels_per_token: int) -> int:
    return math.ceil(width / pixels_per_token) * math.ceil(height / pixels_per_token)


# The real configs (widths as their checkpoints have them; a block or two: only the config matters here), built on
# the meta device; expected: (width, height) trained at, pixels per token.
REAL = {
    "wan2.1-1.3b": ("wan21", wan_config(1536), (832, 480), 16),
    "wan2.1-14b": ("wan21", wan_config(5120), (1280, 720), 16),
    "wan2.2-a14b": ("wan21", wan_config(5120, in_dim=36), (1280, 720), 16),
    "wan2.2-ti2v-5b": ("wan22_5b", wan_config(3072, out_dim=48, in_dim=48), (1280, 704), 32),
    "flux2-dev": ("flux2", {**FLUX2_TINY, "hidden_size": 6144, "num_heads": 48, "axes_dim": [32, 32, 32, 32]},
                  (1024, 1024), 16),
    "flux1-dev": ("flux", {**FLUX_TINY, "hidden_size": 3072, "num_heads": 24, "axes_dim": [16, 56, 56],
                           "txt_ids_dims": []},
                  (1024, 1024), 16),
    "sd3": ("sd3", SD3_TINY, (1024, 1024), 16),  # family defaults: only the config is read
    "qwen-image": ("qwen_image", QWEN_TINY, (1328, 1328), 16),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL))
def test_each_model_gets_its_own_native_size_and_pixels_per_token(node, name):
    import_comfyui()
    from nodes import NODE_CLASS_MAPPINGS  # noqa: F401  (ComfyUI's nodes module, loaded by the fixture)

    node_module = __import__(node.__module__, fromlist=["dit_family"])
    kind, unet, (width, height), pixels_per_token = REAL[name]
    model = random_patcher(*classes(kind), unet, torch.float16, META)
    family = node_module.dit_family(model)
    assert family.native_size == (width, height)
    assert family.pixels_per_token == (pixels_per_token, pixels_per_token)
    assert family.native_tokens == native_tokens_by_hand(width, height, pixels_per_token)
    # At that size, auto mode keeps every image key of a frame.
    config = node.build_config(model, family=family)
    grid_h, grid_w = math.ceil(height / pixels_per_token), math.ceil(width / pixels_per_token)
    assert config.image_token_factor(grid_h, grid_w, family.native_tokens) == 1.0
    assert config.image_token_factor(2 * grid_h, 2 * grid_w, family.native_tokens) == 2.0


def tiny(kind: str, unet: dict):
    """The test renders the plain model itself (Flux.2 needs the pooled vector :func:`render` gives it)."""
    return random_patcher(*classes(kind), unet, torch.float32, seed=0, check_render=False)


def render(model, height: int, width: int) -> torch.Tensor:
    """One Euler step from an empty latent (Flux.2 reads a pooled vector it does not use: a zero one)."""
    import comfy.sample
    from dit_support import conditioning, latent_shape

    positive, negative = conditioning(model, seed=0)
    for cond in (positive, negative):
        cond[0][1].setdefault("pooled_output", torch.zeros(1, 8))
    shape = latent_shape(model, 1, height, width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(
        model, noise, 1, 1.0, "euler", "simple", positive, negative, torch.zeros(shape), disable_pbar=True, seed=0
    )


@pytest.mark.parametrize(
    ("kind", "unet", "native_latent", "text"),
    [
        ("flux2", FLUX2_TINY, (64, 64), FLUX2_TEXT),  # 1024 px at 16 px per latent cell, patch 1: 64 x 64 tokens
        ("wan22_5b", WAN22_5B_TINY, (44, 80), 5),  # 1280 x 704 px at 16 px per latent cell, patch 2: 22 x 40
    ],
    ids=["flux2", "wan2.2-5b"],
)
def test_auto_is_identical_at_native_size_and_reduces_at_twice_the_side(node, kind, unet, native_latent, text):
    import_comfyui()
    model = tiny(kind, unet)
    probed, probe = with_probe(model)
    patched = apply_node(node, probed)  # auto, native size detected
    height, width = native_latent
    plain = render(model, height, width)
    assert torch.isfinite(plain).all()
    assert torch.equal(render(patched, height, width), plain)
    self_attention = probe.self_attention(text)  # Wan's cross-attention has the text as keys
    assert self_attention and all(c.kv_tokens == c.q_tokens for c in self_attention)

    probe.reset()
    render(patched, 2 * height, 2 * width)
    patch = 1 if kind == "flux2" else 2
    full = (2 * height // patch) * (2 * width // patch)
    kept = (height // patch) * (width // patch)  # factor 2 on each side: the native frame's key count
    prefix = text if kind == "flux2" else 0  # Flux.2's joint attention holds the padded text first
    pairs = {(c.q_tokens, c.kv_tokens) for c in probe.self_attention(text)}
    assert pairs == {(prefix + full, prefix + kept)}


def test_wan_14b_at_720p_is_left_alone_where_the_old_budget_reduced_it(node):
    """3600 keys per 1280x720 frame: the 832x480 budget of the 1.3B model once cut them to 1590."""
    import_comfyui()
    node_module = __import__(node.__module__, fromlist=["dit_family"])
    model = random_patcher(*classes("wan21"), wan_config(5120), torch.float16, META)
    family = node_module.dit_family(model)
    config = node.build_config(model, family=family)
    assert family.native_tokens == 45 * 80 == 3600
    assert config.image_token_factor(45, 80, family.native_tokens) == 1.0
    small = node_module.dit_family(random_patcher(*classes("wan21"), wan_config(1536), torch.float16, META))
    assert small.native_tokens == 30 * 52


def test_context_width_is_the_tiny_models():
    assert FLUX2_TINY["context_in_dim"] == CONTEXT_DIM
