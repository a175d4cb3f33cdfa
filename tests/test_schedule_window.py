"""start_percent / end_percent follow the schedule the sampler really uses, wherever the shift node sits.

The standard Flux, SD3, Wan and Qwen-Image graphs put a shift node
(ModelSamplingFlux / SD3 / AuraFlow) right before the sampler; users put ToDo
anywhere between the loader and the sampler. Both orders must reduce the same
steps: the ones whose sigma lies in the window of the shifted schedule.
"""

from __future__ import annotations

import pytest
import torch
from comfy_support import TEXT_TOKENS as UNET_TEXT_TOKENS
from comfy_support import apply_node, import_comfyui, sample, tiny_model
from dit_support import TEXT_TOKENS, sample_dit, tiny_dit, with_probe

pytestmark = pytest.mark.comfyui

STEPS = 10
END_PERCENT = 0.5
SHIFTS = {
    # family: (ComfyUI node class, its method, inputs) as the standard graphs use them
    "flux": ("ModelSamplingFlux", "patch", {"max_shift": 1.15, "base_shift": 0.5, "width": 2048, "height": 2048}),
    "sd3": ("ModelSamplingSD3", "patch", {"shift": 8.0}),
    "wan": ("ModelSamplingSD3", "patch", {"shift": 3.0}),
    "qwen_image": ("ModelSamplingAuraFlow", "patch_aura", {"shift": 1.0}),
    "sd15": ("ModelSamplingDiscrete", "patch", {"sampling": "eps", "zsnr": True}),
}


def shift(model, family: str):
    import comfy_extras.nodes_model_advanced as advanced

    name, method, inputs = SHIFTS[family]
    return getattr(getattr(advanced, name)(), method)(model, **inputs)[0]


def expected_reduced_steps(shifted, scheduler: str) -> int:
    """Steps whose sigma lies in [sigma(end_percent), sigma(0)] of the shifted model's own schedule."""
    import comfy.samplers

    model_sampling = shifted.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, STEPS)[:-1]
    boundary = model_sampling.percent_to_sigma(END_PERCENT)
    return sum(1 for sigma in sigmas.tolist() if sigma >= boundary)


def reduced_steps(node, base, family: str, todo_first: bool) -> tuple[int, int]:
    """(steps ToDo reduced, steps it should have) for one node order."""
    probed, probe = with_probe(base)
    todo = {"mode": "manual", "depth_1_factor": 2.0, "end_percent": END_PERCENT}
    if todo_first:
        model = shift(apply_node(node, probed, **todo), family)
    else:
        model = apply_node(node, shift(probed, family), **todo)
    if family == "sd15":
        out = sample(model, (16, 16), steps=STEPS, cfg=1.0)
        text, scheduler = UNET_TEXT_TOKENS, "normal"
    else:
        out = sample_dit(model, 8, 8, steps=STEPS, frames=2 if family == "wan" else 1)
        text, scheduler = TEXT_TOKENS, "simple"
    assert torch.isfinite(out).all()
    calls = probe.self_attention(text)
    reduced = {c.sigma for c in calls if c.kv_tokens < c.q_tokens}
    assert {c.sigma for c in calls} >= reduced and len({c.sigma for c in calls}) == STEPS
    return len(reduced), expected_reduced_steps(model, scheduler)


@pytest.mark.parametrize("family", list(SHIFTS))
def test_the_window_is_the_same_before_and_after_the_shift_node(node, family):
    import_comfyui()
    base = tiny_model("sd15") if family == "sd15" else tiny_dit(family)
    before, expected = reduced_steps(node, base, family, todo_first=True)
    after, expected_after = reduced_steps(node, base, family, todo_first=False)
    assert expected == expected_after
    assert before == after == expected
    assert 0 < expected < STEPS, "the window must cut the schedule for the test to mean anything"
