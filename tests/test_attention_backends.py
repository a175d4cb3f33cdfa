"""ToDo beside a node that switches the attention backend, in both orders, through ComfyUI's sampler.

The stand-in is written after SageAttention patch nodes: the node clones the model and writes its own function into
``transformer_options["optimized_attention_override"]``, a single slot, without keeping what was there; the function
ignores the ComfyUI backend it is handed and runs its own kernel, which drops masks as SageAttention 2's CUDA kernels
do (here PyTorch SDPA without the mask, so that it runs on the CPU). Applied after ToDo, such a node used to switch
ToDo off without a word; applied before, it used to receive ToDo's mass correction as a mask and drop it.
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_support import apply_node, import_comfyui, random_patcher, sample
from dit_support import TEXT_TOKENS, _flux_config, sample_dit, tiny_dit

from todo_core.dit import sdpa_attention
from todo_core.patch import _warned_kinds

pytestmark = pytest.mark.comfyui

OVERRIDE_KEY = "optimized_attention_override"
MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 2.0}
GRID_KEYS, KEPT_GRID_KEYS = 64, 16  # a 16 x 16 latent with patch 2: an 8 x 8 grid, factor 2 keeps 4 x 4


class SageKernel:
    """The kernel a SageAttention patch node runs: attends without the mask and records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        """(query tokens, key tokens, head width) per call."""

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options: every clone must record here

    def __call__(self, func, q, k, v, heads, *args, skip_reshape=False, skip_output_reshape=False, **kwargs):
        sequence_dim = 2 if skip_reshape else 1
        width = q.shape[-1] if skip_reshape else q.shape[-1] // heads
        self.calls.append((q.shape[sequence_dim], k.shape[sequence_dim], width))
        return sdpa_attention(q, k, v, heads, None, skip_reshape, skip_output_reshape)

    def reset(self) -> None:
        self.calls.clear()


def sage_patch_node(model, kernel: SageKernel):
    """The patch node: a clone whose override slot holds the kernel, whatever was there before."""
    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = kernel
    return patched


def in_order(node, model, kernel: SageKernel, order: str, **inputs):
    if order == "sage_first":
        return apply_node(node, sage_patch_node(model, kernel), **inputs)
    return sage_patch_node(apply_node(node, model, **inputs), kernel)


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comfyui_todo"]


@pytest.fixture(scope="module")
def flux():
    import_comfyui()
    return tiny_dit("flux")


@pytest.fixture(scope="module")
def flux_wide_heads():
    """Heads of 128 channels, as the real Flux has: too wide for SageAttention once a channel is added."""
    import_comfyui()
    import comfy.model_base
    import comfy.supported_models as sm

    config = {**_flux_config(), "hidden_size": 256, "axes_dim": [16, 56, 56]}
    return random_patcher(sm.Flux, comfy.model_base.Flux, config)


@pytest.mark.parametrize("order", ["sage_first", "todo_first"])
def test_dit_keeps_acting_exactly_on_the_sage_kernel(node, flux, order, caplog):
    kernel = SageKernel()
    sample_dit(sage_patch_node(flux, kernel), 16, 16, steps=2)
    plain_calls = list(kernel.calls)
    kernel.reset()
    _warned_kinds.clear()
    with caplog.at_level(logging.INFO, logger="comfyui_todo"):
        out = sample_dit(in_order(node, flux, kernel, order, **MANUAL_2), 16, 16, steps=2)

    # Every call still runs on the kernel; the joint calls with ToDo's keys, on heads folded from 32 to 40.
    assert len(kernel.calls) == len(plain_calls)
    joint = [c for c in kernel.calls if c[0] == TEXT_TOKENS + GRID_KEYS]
    assert joint and all(c == (TEXT_TOKENS + GRID_KEYS, TEXT_TOKENS + KEPT_GRID_KEYS, 40) for c in joint)
    # Exact: the same render as ToDo on ComfyUI's own (mask-honouring) backend.
    reference = sample_dit(apply_node(node, flux, **MANUAL_2), 16, 16, steps=2)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    displaced = [m for m in notes(caplog) if "in place of ToDo's" in m]
    assert len(displaced) == (1 if order == "todo_first" else 0)  # one note per render, only where it was displaced


def test_the_sage_kernel_would_have_dropped_a_correction_mask(node, flux):
    """What the fold prevents: the kernel handed ToDo's mask (as before) gives a clearly different render."""
    kernel = SageKernel()
    kernel.passes_attention_masks = True  # tells ToDo, wrongly, that the mask will be honoured
    dropped = sample_dit(in_order(node, flux, kernel, "sage_first", **MANUAL_2), 16, 16, steps=2)
    exact = sample_dit(in_order(node, flux, SageKernel(), "sage_first", **MANUAL_2), 16, 16, steps=2)
    reference = sample_dit(apply_node(node, flux, **MANUAL_2), 16, 16, steps=2)
    assert (dropped - reference).abs().max() > 100 * max((exact - reference).abs().max(), 1e-7)


@pytest.mark.parametrize("order", ["sage_first", "todo_first"])
def test_heads_too_wide_for_the_kernel_run_the_corrected_calls_on_pytorch(node, flux_wide_heads, order, caplog):
    kernel = SageKernel()
    sample_dit(sage_patch_node(flux_wide_heads, kernel), 16, 16)
    plain_calls = list(kernel.calls)
    kernel.reset()
    _warned_kinds.clear()
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        out = sample_dit(in_order(node, flux_wide_heads, kernel, order, **MANUAL_2), 16, 16)
    joint = [c for c in plain_calls if c == (TEXT_TOKENS + GRID_KEYS, TEXT_TOKENS + GRID_KEYS, 128)]
    assert len(joint) == len(plain_calls) == 4  # 2 double and 2 single blocks, all joint text-image attention
    assert kernel.calls == []  # every one of them corrected: none could stay on the kernel exactly
    assert len([m for m in notes(caplog) if "run on PyTorch's attention" in m]) == 1
    reference = sample_dit(apply_node(node, flux_wide_heads, **MANUAL_2), 16, 16)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["sage_first", "todo_first"])
def test_unet_self_attention_reaches_the_kernel_reduced(node, sd15, order):
    kernel = SageKernel()
    sample(sage_patch_node(sd15, kernel), (16, 16))
    plain = list(kernel.calls)
    kernel.reset()
    out = sample(in_order(node, sd15, kernel, order, **MANUAL_2), (16, 16))
    assert len(kernel.calls) == len(plain)
    full = [c for c in plain if c[0] == 256 and c[1] == 256]  # depth 1 self-attention: a 16 x 16 grid
    reduced = [c for c in kernel.calls if c[0] == 256 and c[1] == 64]
    assert full and len(reduced) == len(full)
    assert torch.isfinite(out).all()
