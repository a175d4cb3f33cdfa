"""The random-weight tiny models every ComfyUI test builds on: fully initialised, reproducible, finite."""

from __future__ import annotations

import pytest
import torch
from comfy_support import empty_memory_is_nan, import_comfyui, plain_render, random_patcher, tiny_model
from dit_support import SD3_TINY, tiny_dit

pytestmark = pytest.mark.comfyui

SD3_WITH_POS_EMBED = {**SD3_TINY, "pos_embed_max_size": 16, "num_patches": 16 * 16}
"""SD3 as its checkpoints are: a ``pos_embed`` buffer that MMDiT allocates with ``torch.empty`` and never fills."""


def sd3_with_pos_embed(seed: int = 0):
    import comfy.model_base
    import comfy.supported_models

    return random_patcher(comfy.supported_models.SD3, comfy.model_base.SD3, dict(SD3_WITH_POS_EMBED), seed=seed)


def garbage_in_freed_memory(numel: int) -> None:
    """Leave NaN in freed memory of the size of the next allocation, as an earlier test may do by chance."""
    for _ in range(4):
        torch.full((numel,), float("nan"))


def test_torch_empty_is_poisoned_only_while_a_model_is_built():
    import_comfyui()
    original = torch.empty
    with empty_memory_is_nan():
        assert torch.isnan(torch.empty(5)).all()
        assert torch.empty(3, dtype=torch.int64).shape == (3,)
        assert torch.empty(2, device="meta").device.type == "meta"
    assert torch.empty is original


def test_a_buffer_the_class_leaves_empty_is_drawn_seeded_and_finite():
    import_comfyui()
    first = sd3_with_pos_embed().model.diffusion_model.pos_embed.clone()
    garbage_in_freed_memory(first.numel())
    second = sd3_with_pos_embed().model.diffusion_model.pos_embed
    assert first.shape == (1, 16 * 16, 128)
    assert torch.isfinite(first).all() and first.std() > 0.01, "pos_embed was left as torch.empty made it"
    assert torch.equal(first, second), "two builds with the same seed must have the same buffers"
    assert not torch.equal(first, sd3_with_pos_embed(seed=1).model.diffusion_model.pos_embed)


def test_sd3_with_its_pos_embed_renders_the_same_twice_and_finite():
    import_comfyui()
    first = plain_render(sd3_with_pos_embed())
    garbage_in_freed_memory(16 * 16 * 128)
    second = plain_render(sd3_with_pos_embed())
    assert torch.isfinite(first).all() and torch.equal(first, second)


@pytest.mark.parametrize("kind", ["sd15", "flux", "sd3", "qwen_image", "wan", "auraflow", "lumina2"])
def test_two_builds_with_the_same_seed_are_bit_identical(kind):
    import_comfyui()

    def build():
        return tiny_model(kind) if kind == "sd15" else tiny_dit(kind)

    first = build().model.state_dict()
    second = build().model.state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), name


def test_computed_buffers_are_kept():
    """Only memory a class leaves empty is drawn: the sampling schedule (outside the diffusion model) is computed."""
    import_comfyui()
    sampling = tiny_dit("flux").model.model_sampling
    sigmas = sampling.sigmas
    assert torch.all(sigmas[1:] > sigmas[:-1]), "the schedule's sigmas rise with the timestep"
    assert float(sampling.sigma_max) == pytest.approx(1.0, abs=1e-3)
