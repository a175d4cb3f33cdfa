"""Compatibility matrix: ToDo beside other models, patches, sampling paths, sizes and dtypes in a real ComfyUI.

Every cell proves one of three things: ToDo acts (K/V token counts measured at ComfyUI's attention backend
with the Probe), ToDo knowingly does not act (output bit-identical to a run without it), or ToDo passes a
layout it cannot place through with one warning. Cells already covered elsewhere (Deep Shrink at block 1,
HyperTile, ToMe, disable_self_attn, the SVD transformer block alone, fp16/bf16 finiteness, the server's
two-branch run) are not repeated here. The size sweep runs the real full-width SD1.5/SDXL UNets on PyTorch's
``meta`` device: real layer structure and shapes, no weights and no arithmetic.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field

import pytest
import torch
from comfy_support import (
    CPU,
    SD15_TINY,
    SDXL_TINY,
    TEXT_TOKENS,
    Probe,
    apply_node,
    forward,
    random_patcher,
    run_node,
    tiny_model,
)
from reference import expected_kv as reference_kv
from reference import expected_unet_kv, latent_hw_for, unet_grid

pytestmark = pytest.mark.comfyui

MANUAL_2 = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 2.0}
MANUAL_OFF = {"mode": "manual", "depth_1_factor": 1.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}
FREELUNCH = "comfy_extras.nodes_freelunch"
DOWNSCALE = "comfy_extras.nodes_model_downscale"
CUSTOM_SAMPLER = "comfy_extras.nodes_custom_sampler"
LOGGER = "comfyui_todo"


# --- helpers --------------------------------------------------------------------------------------------------------


@dataclass
class Recorder(Probe):
    """A Probe that also keeps, per attention call: sigma, batch, dtypes, device, and whether a render was running."""

    extra: list[dict] = field(default_factory=list)

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        self.extra.append(
            {
                "sigma": None if sigmas is None or sigmas.device.type == "meta" else float(sigmas.reshape(-1)[0]),
                "batch": q.shape[0],
                "dtypes": (q.dtype, k.dtype, v.dtype),
                "devices": (q.device, k.device, v.device),
                "kv": k.shape[1],
                "q": q.shape[1],
            }
        )
        return super().__call__(attention, q, k, v, *args, **kwargs)


def with_probe(patcher, probe: Probe):
    """A clone whose sampler runs report every attention call to ``probe``."""
    clone = patcher.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    clone.model_options["transformer_options"] = {**options, "optimized_attention_override": probe}
    return clone


def conditioning(patcher, seed: int = 0, batch: int = 1):
    generator = torch.Generator().manual_seed(seed)
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    extra = {"pooled_output": torch.randn(batch, 1280, generator=generator)} if patcher.model.adm_channels else {}
    positive = [[torch.randn(batch, TEXT_TOKENS, context_dim, generator=generator), dict(extra)]]
    negative = [[torch.randn(batch, TEXT_TOKENS, context_dim, generator=generator), dict(extra)]]
    return positive, negative


def render(
    patcher,
    latent_hw=(24, 40),
    steps: int = 1,
    cfg: float = 7.0,
    sampler: str = "euler",
    batch: int = 1,
    denoise: float = 1.0,
    seed: int = 0,
    positive=None,
    negative=None,
):
    """One comfy.sample.sample run; img2img (a non-zero latent) when ``denoise`` < 1."""
    import comfy.sample

    default_positive, default_negative = conditioning(patcher, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    latent = (
        torch.randn(batch, 4, *latent_hw, generator=generator) if denoise < 1 else torch.zeros(batch, 4, *latent_hw)
    )
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        sampler,
        "normal",
        positive or default_positive,
        negative or default_negative,
        latent,
        denoise=denoise,
        disable_pbar=True,
        seed=seed,
    )


def expected_kv(inputs: dict, latent_hw, grid) -> int:
    """K/V tokens of one self-attention grid for manual node inputs, from the test-side oracle (not todo_core)."""
    assert inputs["mode"] == "manual"
    factors = tuple(inputs[f"depth_{depth}_factor"] for depth in (1, 2, 3))
    return reference_kv(tuple(latent_hw), tuple(grid), factors)


def reduced_grids(probe: Probe) -> set[tuple[int, int]]:
    return {grid for grid, kv in probe.kv_by_grid().items() if any(n < grid[0] * grid[1] for n in kv)}


SD2V_TINY = {**SD15_TINY, "use_linear_in_transformer": True, "context_dim": 1024}
REFINER_TINY = {
    **SDXL_TINY,
    "context_dim": 1280,
    "adm_in_channels": 2560,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": [1, 1, 1, 1],
    "transformer_depth": [0, 1, 1, 0],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1, 0, 0],
}
INPAINT_TINY = {**SD15_TINY, "in_channels": 9}
SVD_TINY = {
    **SD15_TINY,
    "in_channels": 8,
    "use_linear_in_transformer": True,
    "context_dim": 64,
    "adm_in_channels": 768,
    "num_classes": "sequential",
    "use_temporal_attention": True,
    "use_temporal_resblock": True,
    "extra_ff_mix_layer": True,
    "use_spatial_context": True,
    "merge_strategy": "learned_with_images",
    "merge_factor": 0.0,
    "video_kernel_size": [3, 1, 1],
    "disable_temporal_crossattention": True,
}


def model_for(kind: str, dtype=torch.float32):
    import comfy.model_base as base
    import comfy.supported_models as supported

    if kind == "sd2v":
        v_model = functools.partial(base.BaseModel, model_type=base.ModelType.V_PREDICTION)
        return random_patcher(supported.SD20, v_model, SD2V_TINY, dtype, num_head_channels=32)
    if kind == "refiner":
        return random_patcher(supported.SDXLRefiner, base.SDXLRefiner, REFINER_TINY, dtype, num_head_channels=32)
    if kind == "inpaint":
        return random_patcher(supported.SD15, base.BaseModel, INPAINT_TINY, dtype)
    raise ValueError(kind)


def forward_any(patcher, latent_hw=(24, 40), batch: int = 1, probe: Probe | None = None, seed: int = 0):
    """forward() for models with extra inputs: inpaint c_concat, refiner's 2560-wide adm, v-prediction."""
    generator = torch.Generator().manual_seed(seed)
    base = patcher.model
    x = torch.randn(batch, 4, *latent_hw, generator=generator)
    context = torch.randn(batch, TEXT_TOKENS, base.model_config.unet_config["context_dim"], generator=generator)
    kwargs = {"c_crossattn": context}
    in_channels = base.model_config.unet_config["in_channels"]
    if in_channels > 4:
        kwargs["c_concat"] = torch.randn(batch, in_channels - 4, *latent_hw, generator=generator)
    if base.adm_channels:
        kwargs["y"] = torch.randn(batch, base.adm_channels, generator=generator)
    sigmas = torch.ones(batch)
    options = {**patcher.model_options["transformer_options"], "sigmas": sigmas, "wrappers": patcher.wrappers}
    if probe is not None:
        options["optimized_attention_override"] = probe
    with torch.no_grad():
        return base.apply_model(x, sigmas, transformer_options=options, **kwargs)


# --- models ---------------------------------------------------------------------------------------------------------

MODEL_KV = {
    # 24x40 latent, factor 2 at depths 1-3. SD2.x and inpaint have SD1.5's levels (depth 4 = middle, never
    # reduced); the refiner has attention at depths 2-3 only and no middle transformer in this reduced config.
    "sd2v": {(24, 40): {12 * 20}, (12, 20): {6 * 10}, (6, 10): {3 * 5}, (3, 5): {3 * 5}},
    "refiner": {(12, 20): {6 * 10}, (6, 10): {3 * 5}, (3, 5): {3 * 5}},
    "inpaint": {(24, 40): {12 * 20}, (12, 20): {6 * 10}, (6, 10): {3 * 5}, (3, 5): {3 * 5}},
}
NATIVE = {"sd2v": 768, "refiner": 1024, "inpaint": 512}


@pytest.mark.parametrize("kind", sorted(MODEL_KV))
def test_model_family_effect_identity_and_native_resolution(node, kind):
    model = model_for(kind)
    patched = apply_node(node, model, **MANUAL_2)
    (todo,) = patched.model_options["transformer_options"]["patches"]["attn1_patch"]
    probe = Probe()
    out = forward_any(patched, probe=probe)
    assert out.shape == (1, 4, 24, 40) and torch.isfinite(out).all()
    assert probe.kv_by_grid() == MODEL_KV[kind]
    assert todo.config.native_resolution == NATIVE[kind]
    unpatched = forward_any(model)
    assert torch.equal(forward_any(apply_node(node, model, **MANUAL_OFF)), unpatched)
    assert torch.equal(forward_any(apply_node(node, model)), unpatched), "auto at 320x192 px is below native"


def test_sd2_v_prediction_model_samples(node):
    import comfy.model_base

    v_model = model_for("sd2v")
    assert v_model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    probe = Probe()
    out = render(with_probe(apply_node(node, v_model, **MANUAL_2), probe), steps=1)
    assert torch.isfinite(out).all()
    assert (24, 40) in reduced_grids(probe)
    assert torch.equal(render(apply_node(node, v_model, **MANUAL_OFF)), render(v_model))


def test_svd_spatial_attention_reduced_temporal_untouched(node):
    import comfy.model_base
    import comfy.supported_models

    svd = (comfy.supported_models.SVD_img2vid, comfy.model_base.SVD_img2vid)
    model = random_patcher(*svd, SVD_TINY, num_head_channels=32)
    patched = apply_node(node, model, mode="manual", depth_1_factor=2.0, depth_2_factor=2.0, depth_3_factor=1.0)
    frames, h, w = 3, 16, 24
    probe = Probe()
    options = {**patched.model_options["transformer_options"], "optimized_attention_override": probe}
    with torch.no_grad():
        out = patched.model.apply_model(
            torch.randn(frames, 4, h, w),
            torch.ones(frames),
            c_concat=torch.randn(frames, 4, h, w),
            c_crossattn=torch.randn(frames, 1, 64),
            y=torch.randn(frames, 768),
            num_video_frames=frames,
            image_only_indicator=torch.zeros(1, frames),
            transformer_options=options,
        )
    assert out.shape == (frames, 4, h, w) and torch.isfinite(out).all()
    per_block: dict = {}
    for call in probe.calls:
        kind = "temporal" if call.q_tokens == frames else "cross" if call.kv_tokens == 1 else "spatial"
        per_block.setdefault(call.block, {}).setdefault(kind, set()).add((call.grid, call.q_tokens, call.kv_tokens))
    assert len(per_block) == 10  # 3 input, 1 middle, 6 output transformer blocks
    for block, kinds in per_block.items():
        assert set(kinds) == {"spatial", "cross", "temporal"}, block
        ((grid, q, kv),) = kinds["spatial"]
        assert q == grid[0] * grid[1]
        assert kv == {(16, 24): 8 * 12, (8, 12): 4 * 6}.get(grid, q), f"spatial self-attention of {block}"
        assert kinds["temporal"] == {(grid, frames, frames)}, f"temporal attention of {block} was touched"


# --- other patches on the same MODEL --------------------------------------------------------------------------------


@pytest.mark.parametrize("freeu", ["FreeU", pytest.param("FreeU_V2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("order", ["freeu_first", "todo_first"])
def test_freeu(node, sd15, freeu, order):
    def free(model):
        return run_node(freeu, FREELUNCH, model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)

    def todo(model, **inputs):
        return apply_node(node, model, **inputs)

    def both(**inputs):
        return todo(free(sd15), **inputs) if order == "freeu_first" else free(todo(sd15, **inputs))

    freeu_alone = forward(free(sd15), (24, 40))
    assert not torch.equal(freeu_alone, forward(sd15, (24, 40))), "FreeU did not act"
    assert torch.equal(forward(both(**MANUAL_OFF), (24, 40)), freeu_alone)
    probe = Probe()
    out = forward(both(**MANUAL_2), (24, 40), probe=probe)
    assert torch.isfinite(out).all() and not torch.equal(out, freeu_alone)
    assert probe.kv_by_grid() == MODEL_KV["inpaint"]  # SD1.5 levels: effect present, FreeU only scales features


@pytest.mark.parametrize("block_number", [2, 3])
@pytest.mark.parametrize("shrink", [1.25, 2.0, 3.0])
@pytest.mark.parametrize("order", ["deep_shrink_first", "todo_first"])
def test_deep_shrink_more_blocks_and_factors(node, sd15, block_number, shrink, order):
    def deep_shrink(model):
        return run_node(
            "PatchModelAddDownscale", DOWNSCALE, model, block_number=block_number, downscale_factor=shrink,
            start_percent=0.0, end_percent=0.35, downscale_after_skip=True, downscale_method="bicubic",
            upscale_method="bicubic",
        )  # fmt: skip

    inputs = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 1.0}
    patched = apply_node(node, deep_shrink(sd15), **inputs) if order == "deep_shrink_first" else None
    patched = patched or deep_shrink(apply_node(node, sd15, **inputs))
    probe = Probe()
    out = forward(patched, (48, 40), batch=1, sigma=14.0, probe=probe)
    assert out.shape == (1, 4, 48, 40) and torch.isfinite(out).all()
    grids = probe.kv_by_grid()
    assert set(grids) != {(48, 40), (24, 20), (12, 10), (6, 5)}, "Deep Shrink did not act: the test proves nothing"
    for grid, kv in grids.items():
        assert kv == {expected_kv(inputs, (48, 40), grid)}, grid
    assert reduced_grids(probe), "ToDo should act beside Deep Shrink"


def sag_or_pag(name: str, model):
    if name == "SelfAttentionGuidance":
        return run_node(name, "comfy_extras.nodes_sag", model, scale=0.5, blur_sigma=2.0)
    return run_node("PerturbedAttentionGuidance", "comfy_extras.nodes_pag", model, scale=3.0)


@pytest.mark.parametrize("guidance", ["SelfAttentionGuidance", "PerturbedAttentionGuidance"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("order", ["guidance_first", "todo_first"])
def test_sag_and_pag(node, guidance, kind, order, request):
    """Both replace the middle block's attn1. SD1.5's middle is depth 4 (never reduced); SDXL's is depth 3."""
    model = request.getfixturevalue(kind)
    patched = (
        apply_node(node, sag_or_pag(guidance, model), **MANUAL_2)
        if order == "guidance_first"
        else sag_or_pag(guidance, apply_node(node, model, **MANUAL_2))
    )
    probe = Probe()
    out = render(with_probe(patched, probe), (32, 32), steps=1, cfg=5.0)
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
    assert reduced_grids(probe), "ToDo should act beside the guidance"
    alone = render(sag_or_pag(guidance, model), (32, 32), steps=1, cfg=5.0)
    assert not torch.equal(out, alone)
    off = (
        apply_node(node, sag_or_pag(guidance, model), **MANUAL_OFF)
        if order == "guidance_first"
        else sag_or_pag(guidance, apply_node(node, model, **MANUAL_OFF))
    )
    assert torch.equal(render(off, (32, 32), steps=1, cfg=5.0), alone)


def lora_for(patcher, rank: int = 4, seed: int = 0) -> dict:
    """A LoRA file's state dict for every attn1 q/k/v of the first transformer block, in kohya naming."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for proj in ("to_q", "to_k", "to_v"):
        name = f"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_{proj}"
        weight = patcher.model.state_dict()[
            f"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.{proj}.weight"
        ]
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator)
        lora[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator)
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def test_lora_weight_patches_in_both_orders(node, sd15):
    import comfy.sd

    lora = lora_for(sd15)

    def with_lora(model):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        assert len(patched.patches) == 3
        return patched

    lora_alone = render(with_lora(sd15))
    assert not torch.equal(lora_alone, render(sd15)), "the LoRA did not act"
    assert torch.equal(render(apply_node(node, with_lora(sd15), **MANUAL_OFF)), lora_alone)
    probe_a, probe_b = Probe(), Probe()
    lora_then_todo = render(with_probe(apply_node(node, with_lora(sd15), **MANUAL_2), probe_a))
    todo_then_lora = render(with_probe(with_lora(apply_node(node, sd15, **MANUAL_2)), probe_b))
    assert torch.equal(lora_then_todo, todo_then_lora), "weight patches and ToDo commute"
    assert not torch.equal(lora_then_todo, lora_alone)
    assert (24, 40) in reduced_grids(probe_a) and probe_a.kv_by_grid() == probe_b.kv_by_grid()


def tiny_controlnet(patcher):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = copy.deepcopy(patcher.model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, dtype=torch.float32, device=CPU, operations=comfy.ops.disable_weight_init)
    torch.manual_seed(1)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    with torch.no_grad():
        for parameter in control_model.parameters():  # zero convs would make the ControlNet a no-op
            parameter.normal_(0.0, 0.05)
    return comfy.controlnet.ControlNet(control_model, load_device=CPU, manual_cast_dtype=None)


def test_controlnet_conditioning(node, sd15):
    """ControlNet's own attention gets no transformer_options from ComfyUI, so ToDo acts in the UNet only."""
    import nodes

    positive, negative = conditioning(sd15)
    hint = torch.rand(1, 24 * 8, 40 * 8, 3, generator=torch.Generator().manual_seed(2))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, tiny_controlnet(sd15), hint, 1.0, 0.0, 1.0
    )
    controlled = render(sd15, positive=positive, negative=negative)
    assert not torch.equal(controlled, render(sd15)), "the ControlNet did not act"
    off = apply_node(node, sd15, **MANUAL_OFF)
    assert torch.equal(render(off, positive=positive, negative=negative), controlled)
    probe = Probe()
    out = render(with_probe(apply_node(node, sd15, **MANUAL_2), probe), positive=positive, negative=negative)
    assert torch.isfinite(out).all() and not torch.equal(out, controlled)
    assert probe.kv_by_grid() == MODEL_KV["inpaint"]


@pytest.mark.parametrize("order", ["replace_first", "todo_first"])
def test_attn2_replacement_as_ip_adapter_uses(node, sd15, order):
    """An IP-Adapter-like attn2 replacement on every cross-attention: it keeps every query, ToDo keeps its attn1."""
    from comfy.ldm.modules.attention import optimized_attention

    image_tokens = torch.randn(1, 4, 320, generator=torch.Generator().manual_seed(5))
    seen_queries = []

    def ip_adapter(q, k, v, extra_options):
        seen_queries.append((q.shape[1], tuple(extra_options["activations_shape"][-2:])))
        heads = extra_options["n_heads"]
        out = optimized_attention(q, k, v, heads)
        ip = image_tokens[..., : q.shape[-1]].expand(q.shape[0], -1, -1)
        return out + 0.5 * optimized_attention(q, ip, ip, heads)

    def replace(model):
        model = model.clone()
        for block in [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8)]:
            model.set_model_attn2_replace(ip_adapter, *block)
        for index in range(3, 12):
            model.set_model_attn2_replace(ip_adapter, "output", index)
        model.set_model_attn2_replace(ip_adapter, "middle", 0)
        return model

    def both(**inputs):
        return (
            apply_node(node, replace(sd15), **inputs)
            if order == "replace_first"
            else replace(apply_node(node, sd15, **inputs))
        )

    alone = forward(replace(sd15), (24, 40))
    assert seen_queries and not torch.equal(alone, forward(sd15, (24, 40)))
    assert torch.equal(forward(both(**MANUAL_OFF), (24, 40)), alone)
    seen_queries.clear()
    probe = Probe()
    out = forward(both(**MANUAL_2), (24, 40), probe=probe)
    assert torch.isfinite(out).all() and not torch.equal(out, alone)
    assert seen_queries and all(q == grid[0] * grid[1] for q, grid in seen_queries), "queries must stay whole"
    assert probe.kv_by_grid() == MODEL_KV["inpaint"]


# --- sampling paths -------------------------------------------------------------------------------------------------


def ksampler_node(model, positive, negative, cfg=7.0):
    import nodes

    latent = {"samples": torch.zeros(1, 4, 24, 40)}
    return nodes.common_ksampler(model, 3, 2, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def custom_advanced(model, positive, negative, cfg=7.0):
    def out(node_id, **inputs):
        import importlib

        result = getattr(importlib.import_module(CUSTOM_SAMPLER), node_id).execute(**inputs)
        return result.result if hasattr(result, "result") else result

    (guider,) = out("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg)
    (sampler,) = out("KSamplerSelect", sampler_name="euler")
    (sigmas,) = out("BasicScheduler", model=model, scheduler="normal", steps=2, denoise=1.0)
    (noise,) = out("RandomNoise", noise_seed=3)
    latent, _ = out(
        "SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
        latent_image={"samples": torch.zeros(1, 4, 24, 40)},
    )  # fmt: skip
    return latent["samples"]


@pytest.mark.parametrize("path", [ksampler_node, custom_advanced], ids=["KSampler", "SamplerCustomAdvanced"])
def test_sampler_nodes(node, sd15, path):
    positive, negative = conditioning(sd15)
    unpatched = path(sd15, positive, negative)
    assert torch.equal(path(apply_node(node, sd15, **MANUAL_OFF), positive, negative), unpatched)
    probe = Probe()
    out = path(with_probe(apply_node(node, sd15, **MANUAL_2), probe), positive, negative)
    assert torch.isfinite(out).all() and not torch.equal(out, unpatched)
    assert probe.kv_by_grid() == MODEL_KV["inpaint"]


@pytest.mark.parametrize("sampler", ["heun", pytest.param("dpmpp_2s_ancestral", marks=pytest.mark.slow)])
def test_samplers_that_evaluate_twice_per_step(node, sd15, sampler):
    steps = 2
    assert torch.equal(render(apply_node(node, sd15, **MANUAL_OFF), steps=steps, sampler=sampler),
                       render(sd15, steps=steps, sampler=sampler))  # fmt: skip
    probe = Recorder()
    out = render(with_probe(apply_node(node, sd15, **MANUAL_2), probe), steps=steps, sampler=sampler)
    assert torch.isfinite(out).all()
    evaluations = [c for c in probe.self_attention() if c.block == ("input", 1)]
    assert len(evaluations) > steps, "the sampler should evaluate the model more than once per step"
    assert all(e["kv"] < e["q"] for e in probe.extra if e["q"] == 24 * 40), "ToDo acts in every evaluation"


@pytest.mark.parametrize("cfg", [1.0, 7.0])
@pytest.mark.parametrize("batch", [1, 2, *(pytest.param(b, marks=pytest.mark.slow) for b in (3, 4))])
def test_cfg_and_batch_sizes(node, sd15, cfg, batch):
    probe = Recorder()
    out = render(with_probe(apply_node(node, sd15, **MANUAL_2), probe), cfg=cfg, batch=batch)
    assert out.shape == (batch, 4, 24, 40) and torch.isfinite(out).all()
    # CFG 1 skips the uncond: one batch per call; CFG > 1 runs cond and uncond together.
    assert {e["batch"] for e in probe.extra} == {batch if cfg == 1.0 else 2 * batch}
    assert probe.kv_by_grid() == MODEL_KV["inpaint"]
    if batch in (1, 4):
        plain = render(sd15, cfg=cfg, batch=batch)
        assert torch.equal(render(apply_node(node, sd15, **MANUAL_OFF), cfg=cfg, batch=batch), plain)


@pytest.mark.slow
def test_cond_and_uncond_split_when_memory_is_short(node, sd15, monkeypatch):
    patched = apply_node(node, sd15, **MANUAL_2)
    together = render(patched, steps=2)
    # What ComfyUI does when cond and uncond together would not fit: one model call each.
    monkeypatch.setattr(sd15.model, "memory_required", lambda *args, **kwargs: float("inf"))
    probe = Recorder()
    split = render(with_probe(patched, probe), steps=2)
    assert {e["batch"] for e in probe.extra} == {1}, "low memory should run cond and uncond separately"
    assert probe.kv_by_grid() == MODEL_KV["inpaint"]
    torch.testing.assert_close(split, together, rtol=1e-4, atol=1e-4)
    assert torch.equal(render(apply_node(node, sd15, **MANUAL_OFF), steps=2), render(sd15, steps=2))


@pytest.mark.slow
def test_img2img_with_denoise_below_one(node, sd15):
    kwargs = {"steps": 2, "denoise": 0.5}
    plain = render(sd15, **kwargs)
    assert torch.equal(render(apply_node(node, sd15, **MANUAL_OFF), **kwargs), plain)
    probe = Probe()
    out = render(with_probe(apply_node(node, sd15, **MANUAL_2), probe), **kwargs)
    assert not torch.equal(out, plain) and probe.kv_by_grid() == MODEL_KV["inpaint"]
    # The window is in percent of the model's schedule, not of this run's: a window that ends before the
    # denoise-0.5 run starts never opens (knowingly absent), whatever the run's length.
    early_only = apply_node(node, sd15, **MANUAL_2, start_percent=0.0, end_percent=0.2)
    assert torch.equal(render(early_only, **kwargs), plain)


def test_sigma_window_switches_on_and_off_within_one_render(node, sd15):
    patched = apply_node(node, sd15, **MANUAL_2, start_percent=0.0, end_percent=0.5)
    boundary = sd15.get_model_object("model_sampling").percent_to_sigma(0.5)
    probe = Recorder()
    out = render(with_probe(patched, probe), steps=4)
    assert torch.isfinite(out).all()
    depth_1 = [e for e in probe.extra if e["q"] == 24 * 40 and e["kv"] != TEXT_TOKENS]
    on = {e["sigma"] for e in depth_1 if e["kv"] == 12 * 20}
    off = {e["sigma"] for e in depth_1 if e["kv"] == 24 * 40}
    assert on and off, "the window should open and close inside the render"
    assert min(on) >= boundary > max(off)


# --- sizes (meta device: real full-width layers, shapes only) --------------------------------------------------------

SIZES = list(range(512, 2048 + 1, 64))
SPECIAL_SIZES = [(1920, 1080), (1000, 584), (832, 1216), (3840, 2160)]


@pytest.fixture(scope="module")
def full_unets():
    import comfy.model_base
    import comfy.supported_models

    from benchmarks.comfyui_level import FULL_UNETS

    meta = torch.device("meta")
    classes = {"sd15": (comfy.supported_models.SD15, comfy.model_base.BaseModel),
               "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL)}  # fmt: skip
    return {kind: random_patcher(*classes[kind], FULL_UNETS[kind], torch.float16, meta) for kind in classes}


FULL_NATIVE = {"sd15": 512, "sdxl": 1024}
FULL_LAYERS = {"sd15": {1: 5, 2: 5, 3: 5, 4: 1}, "sdxl": {2: 10, 3: 60}}
"""Self-attention layers per depth of the full UNets: SD1.5 has 2 input + 3 output blocks at depths 1-3 and the
middle at depth 4; SDXL has 2 + 3 blocks of 2 transformers at depth 2, of 10 at depth 3, and a 10-deep middle."""


def check_size(node, unet, width: int, height: int) -> None:
    """One full-UNet evaluation on the meta device; every self-attention K/V count as the test oracle counts it."""
    kind = "sdxl" if unet.model.adm_channels else "sd15"
    patched = apply_node(node, unet)
    meta = torch.device("meta")
    latent_hw = latent_hw_for(width, height)
    probe = Recorder(compute=False)
    options = {**patched.model_options["transformer_options"], "optimized_attention_override": probe}
    options["wrappers"] = patched.wrappers
    context = torch.zeros(1, TEXT_TOKENS, unet.model.model_config.unet_config["context_dim"], device=meta)
    extra = {"y": torch.zeros(1, 2816, device=meta, dtype=torch.float16)} if kind == "sdxl" else {}
    with torch.no_grad():
        out = unet.model.diffusion_model(
            torch.zeros(1, 4, *latent_hw, device=meta, dtype=torch.float16),
            torch.zeros(1, device=meta),
            context.half(),
            transformer_options=options,
            **extra,
        )
    assert out.shape == (1, 4, *latent_hw), (width, height)
    layers = FULL_LAYERS[kind]
    expected = expected_unet_kv(latent_hw, layers, native_resolution=FULL_NATIVE[kind])
    assert probe.kv_by_grid() == expected, (width, height)
    calls_per_grid: dict = {}
    for call in probe.self_attention():
        calls_per_grid[call.grid] = calls_per_grid.get(call.grid, 0) + 1
    assert calls_per_grid == {unet_grid(latent_hw, depth): count for depth, count in layers.items()}, (width, height)
    assert all(e["dtypes"] == (torch.float16,) * 3 and e["devices"] == (meta,) * 3 for e in probe.extra)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_special_sizes_and_a_diagonal_of_the_sweep(node, full_unets, kind):
    sizes = SPECIAL_SIZES + [(side, SIZES[-1 - i]) for i, side in enumerate(SIZES[::6])]
    for width, height in sizes:
        check_size(node, full_unets[kind], width, height)


@pytest.mark.slow
def test_every_size_from_512_to_2048_in_steps_of_64(node, full_unets):
    checked = 0
    for width in SIZES:
        for height in SIZES:
            check_size(node, full_unets["sd15"], width, height)
            checked += 1
    assert checked == 625


# --- dtypes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, *(pytest.param(d, marks=pytest.mark.slow) for d in (torch.float16, torch.bfloat16))]
)
def test_dtype_and_device_are_kept(node, dtype):
    model = tiny_model("sd15", dtype=dtype)
    probe = Recorder()
    out = forward(apply_node(node, model, **MANUAL_2), (24, 40), batch=1, probe=probe)
    plain = forward(model, (24, 40), batch=1)
    assert out.dtype == plain.dtype and out.device == plain.device and torch.isfinite(out).all()
    assert probe.kv_by_grid() == MODEL_KV["inpaint"]
    compute_dtypes = {e["dtypes"] for e in probe.extra}
    assert len(compute_dtypes) == 1 and len(set(next(iter(compute_dtypes)))) == 1, compute_dtypes
    assert {e["devices"] for e in probe.extra} == {(CPU, CPU, CPU)}


# --- warnings: once per render, never a flood -----------------------------------------------------------------------


@pytest.fixture
def fresh_warnings():
    import todo_core.patch

    modules = [todo_core.patch]
    loaded = __import__("sys").modules
    modules += [m for name, m in loaded.items() if name.endswith("todo_core.patch") and m is not todo_core.patch]
    for module in modules:
        if hasattr(module, "_warned_kinds"):
            module._warned_kinds.clear()
    yield
    for module in modules:
        if hasattr(module, "_warned_kinds"):
            module._warned_kinds.clear()


def off_grid(model):
    """An attn1 patch before ToDo that drops a key/value token: K/V no longer fill the activation grid."""
    model = model.clone()
    model.set_model_attn1_patch(lambda q, k, v, extra: (q, k[:, :-1], v[:, :-1]))
    return model


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_layout_it_cannot_place_warns_once_per_render(node, sd15, caplog, fresh_warnings):
    patched = apply_node(node, off_grid(sd15), **MANUAL_2)
    probe = Probe()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = render(with_probe(patched, probe), steps=3)
        after_first = len(todo_warnings(caplog))
        render(patched, steps=3)
        after_second = len(todo_warnings(caplog))
    assert torch.isfinite(first).all()
    self_attention = probe.self_attention()
    assert len(self_attention) > 20, "the render should have run"
    assert all(c.kv_tokens == c.grid[0] * c.grid[1] - 1 for c in self_attention), "passed through, unreduced"
    assert after_first == 1, todo_warnings(caplog)
    assert after_second == 2, f"a second render should warn once more: {todo_warnings(caplog)}"
    assert "grid" in todo_warnings(caplog)[0]


def test_direct_model_calls_without_a_render_warn_at_most_once(node, sd15, caplog, fresh_warnings):
    patched = apply_node(node, off_grid(sd15), **MANUAL_2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for seed in range(3):
            forward(patched, (24, 40), batch=1, seed=seed)
    assert len(todo_warnings(caplog)) <= 1


# --- cloning: applying twice, two branches, removing ----------------------------------------------------------------


def test_applying_twice_equals_applying_once_without_a_warning(node, sd15, caplog, fresh_warnings):
    once = apply_node(node, sd15, **MANUAL_2)
    twice = apply_node(node, once, **MANUAL_2)
    assert len(sd15.model_options["transformer_options"].get("patches", {}).get("attn1_patch", [])) == 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert torch.equal(render(twice), render(once))
    assert todo_warnings(caplog) == [], "a second ToDo node should not report the first one's K/V as off-grid"


def test_two_branches_and_removal_never_leak(node, sd15):
    before = render(sd15)
    options_before = repr(sd15.model_options)
    branch_a = apply_node(node, sd15, **MANUAL_2)
    branch_b = apply_node(node, sd15, mode="manual", depth_1_factor=3.0, depth_2_factor=1.0, depth_3_factor=1.0)
    a_alone, b_alone = render(branch_a), render(branch_b)
    assert not torch.equal(a_alone, b_alone)
    # Interleaved, as a graph with both branches runs them: each branch only ever sees its own patch.
    assert torch.equal(render(sd15), before)
    assert torch.equal(render(branch_b), b_alone)
    assert torch.equal(render(branch_a), a_alone)
    assert torch.equal(render(sd15), before), "the graph without the node is what it was before"
    assert repr(sd15.model_options) == options_before and not sd15.wrappers


def test_the_last_todo_node_of_a_chain_decides(node, sd15):
    first = apply_node(node, sd15, mode="manual", depth_1_factor=3.0, depth_2_factor=2.0, depth_3_factor=1.0)
    last = apply_node(node, first, **MANUAL_2)
    assert torch.equal(render(last), render(apply_node(node, sd15, **MANUAL_2)))
    off = apply_node(node, first, **MANUAL_OFF)
    assert torch.equal(render(off), render(sd15)), "a ToDo node at factor 1 after another turns ToDo off"
