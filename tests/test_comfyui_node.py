"""ToDoModelPatch inside a real ComfyUI (skipped with instructions when none is found)."""

from __future__ import annotations

import sys

import pytest
import torch
from comfy_support import Probe, apply_node, forward, sample, tiny_model
from reference import expected_unet_kv, latent_hw_for

pytestmark = pytest.mark.comfyui


def node_module(node):
    return sys.modules[node.__module__]


MANUAL_OFF = {"mode": "manual", "depth_1_factor": 1.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0}


# --- the node as ComfyUI sees it ---------------------------------------------------------------------------------


def test_loads_through_comfyui_loader_with_its_inputs(node):
    import nodes

    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ToDoModelPatch"] == "ToDo: Token Downsampling"
    info = node.GET_NODE_INFO_V1()
    assert info["category"] == "model_patches/unet"
    assert info["description"]
    required = info["input"]["required"]
    assert list(required) == [
        "model",
        "mode",
        "depth_1_factor",
        "depth_2_factor",
        "depth_3_factor",
        "method",
        "start_percent",
        "end_percent",
        "native_resolution",
    ]
    optional = info["input"]["optional"]  # added later: API prompts without them stay valid
    assert list(optional) == ["dit_blocks", "temporal_factor", "max_error", "report_error"]
    for name, (_, options) in {**required, **optional}.items():
        assert options.get("tooltip"), f"input {name} has no tooltip"
    assert all(info["output_tooltips"])
    assert info["output"] == ["MODEL"]
    assert required["method"][1]["options"][0] == "nearest"


def test_v1_mappings_hold_exactly_the_node_registered_once(node):
    """Tools that read only NODE_CLASS_MAPPINGS (comfy-test's instantiation level) see the node and construct it."""
    import nodes

    pack = sys.modules[node.__module__.rpartition(".")[0]]
    mappings, display_names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    assert mappings == {"ToDoModelPatch": node}
    assert display_names == {"ToDoModelPatch": "ToDo: Token Downsampling"}
    assert callable(pack.comfy_entrypoint)
    assert [name for name, cls in nodes.NODE_CLASS_MAPPINGS.items() if cls is node] == ["ToDoModelPatch"]
    assert isinstance(node(), node)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"depth_1_factor": 0.5}, "depth_1_factor must be between 1 and 8"),
        ({"method": "nearest-ish"}, "method must be one of"),
        ({"start_percent": 0.8, "end_percent": 0.2}, "must not be greater than end_percent"),
        ({"native_resolution": 16}, "native_resolution must be between 64 and 8192"),
    ],
)
def test_validation_rejects_bad_input_before_the_graph_runs(node, inputs, message):
    result = node.validate_inputs(**inputs)
    assert isinstance(result, str) and message in result
    assert node.validate_inputs(mode="auto", method="area", model=None) is True


def test_execute_clones_and_never_mutates_the_input(node, sd15):
    options_before = repr(sd15.model_options)
    patched = apply_node(node, sd15)
    assert patched is not sd15
    assert repr(sd15.model_options) == options_before
    assert len(patched.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    assert "patches" not in sd15.model_options["transformer_options"]


def test_native_resolution_detected_from_the_model(node, sd15, sdxl):
    node_module = sys.modules[node.__module__]
    assert node_module.detect_native_resolution(sd15) == 512
    assert node_module.detect_native_resolution(sdxl) == 1024


# --- identity -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_factor_one_is_bit_identical(node, kind, request):
    model = request.getfixturevalue(kind)
    unpatched = forward(model, (37, 45))
    assert torch.equal(forward(apply_node(node, model, **MANUAL_OFF), (37, 45)), unpatched)
    # Auto mode at native size registers the patch, which must then change nothing.
    auto = apply_node(node, model, native_resolution=37 * 8 * 2)
    assert auto.model_options["transformer_options"]["patches"]["attn1_patch"]
    assert torch.equal(forward(auto, (37, 45)), unpatched)


def test_factor_one_is_bit_identical_through_the_sampler(node, sd15):
    unpatched = sample(sd15, (40, 24), steps=2, cfg=7.0)
    auto_noop = apply_node(node, sd15, native_resolution=512)
    assert torch.equal(sample(auto_noop, (40, 24), steps=2, cfg=7.0), unpatched)


# --- what gets reduced ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_hw", [(73, 125), (152, 104), (37, 45)])  # 1000x584, 832x1216, 360x296 px
def test_sd15_manual_reduces_only_the_configured_depth_at_odd_sizes(node, sd15, latent_hw):
    probe = Probe()
    patched = apply_node(node, sd15, mode="manual", depth_1_factor=2.0, depth_2_factor=1.0, depth_3_factor=1.0)
    out = forward(patched, latent_hw, batch=1, probe=probe)
    assert out.shape == (1, 4, *latent_hw) and torch.isfinite(out).all()
    h, w = latent_hw
    seen = probe.kv_by_grid()
    assert seen[(h, w)] == {-(-h // 2) * -(-w // 2)}
    for grid, kv in seen.items():
        if grid != (h, w):
            assert kv == {grid[0] * grid[1]}, f"grid {grid} was reduced"
    assert all(c.q_tokens == c.grid[0] * c.grid[1] for c in probe.calls), "queries must keep every token"


def test_1920x1080_every_depth_odd_somewhere(node, sd15):
    # Latent 240x135: depth 2 is 120x68, depth 3 60x34, middle 30x17 (ceil, not floor).
    probe = Probe()
    patched = apply_node(node, sd15, mode="manual", depth_1_factor=4.0, depth_2_factor=2.0, depth_3_factor=3.0)
    out = forward(patched, (135, 240), batch=1, probe=probe)
    assert out.shape == (1, 4, 135, 240) and torch.isfinite(out).all()
    assert probe.kv_by_grid() == {
        (135, 240): {34 * 60},
        (68, 120): {34 * 60},
        (34, 60): {12 * 20},
        (17, 30): {17 * 30},
    }


def test_sd15_auto_halves_every_depth_at_twice_native(node, sd15):
    probe = Probe()
    forward(apply_node(node, sd15, native_resolution=256), (64, 64), batch=1, probe=probe)
    assert probe.kv_by_grid() == {(64, 64): {32 * 32}, (32, 32): {16 * 16}, (16, 16): {8 * 8}, (8, 8): {8 * 8}}


def test_sdxl_auto_reduces_both_attention_depths(node, sdxl):
    probe = Probe()
    forward(apply_node(node, sdxl, native_resolution=256), (64, 64), batch=1, probe=probe)
    assert probe.kv_by_grid() == {(32, 32): {16 * 16}, (16, 16): {8 * 8}}


def test_sdxl_defaults_act_at_high_resolution(node, sdxl):
    # Defaults detect SDXL's 1024 px; at 2048 px its depth-2 (128x128) and depth-3 (64x64) keys are halved per side.
    patched = apply_node(node, sdxl)
    (todo_patch,) = patched.model_options["transformer_options"]["patches"]["attn1_patch"]
    assert todo_patch.config.native_resolution == 1024
    n2, n3 = torch.zeros(1, 128 * 128, 8), torch.zeros(1, 64 * 64, 8)
    latent = [1, 4, 256, 256]
    _, k2, _ = todo_patch(n2, n2, n2, {"original_shape": latent, "activations_shape": [1, 8, 128, 128]})
    _, k3, _ = todo_patch(n3, n3, n3, {"original_shape": latent, "activations_shape": [1, 8, 64, 64]})
    assert (k2.shape[1], k3.shape[1]) == (64 * 64, 32 * 32)


TINY_ATTENTION_DEPTHS = {"sd15": (1, 2, 3, 4), "sdxl": (2, 3)}
"""Depths with self-attention in the tiny UNets: SD1.5's levels 1-3 and middle; SDXL's levels 2-3, middle at 3."""
NATIVE = {"sd15": 512, "sdxl": 1024}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("size", [(1024, 1024), (1536, 1536), (2048, 2048), (1920, 1080)])
def test_default_node_kv_counts_match_the_oracle_and_the_demo(node, kind, size, request):
    """What ComfyUI's attention gets with the default node is what the test oracle counts; the demo's table agrees."""
    from todo_core.architectures import LAYOUTS
    from todo_core.demo import measure

    model = request.getfixturevalue(kind)
    width, height = size
    latent_hw = latent_hw_for(width, height)
    probe = Probe(compute=False)
    forward(apply_node(node, model), latent_hw, batch=1, probe=probe)
    expected = expected_unet_kv(latent_hw, TINY_ATTENTION_DEPTHS[kind], native_resolution=NATIVE[kind])
    assert probe.kv_by_grid() == expected
    acts = any(kv < grid[0] * grid[1] for grid, (kv,) in expected.items())
    assert acts == (width * height > NATIVE[kind] ** 2), "the default node acts above the native pixel count"
    todo_patch = node_module(node).ToDoAttn1Patch(node_module(node).ToDoConfig.create(native_resolution=NATIVE[kind]))
    demo = {(r["grid_h"], r["grid_w"]): {r["kv_tokens"]} for r in measure(LAYOUTS[kind], width, height, todo_patch)}
    assert demo == expected


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_any_batch_size(node, sd15, batch):
    probe = Probe()
    patched = apply_node(node, sd15, mode="manual", depth_1_factor=3.0)
    out = forward(patched, (30, 44), batch=batch, probe=probe)
    assert out.shape[0] == batch
    assert probe.kv_by_grid()[(30, 44)] == {10 * 15}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(node, dtype):
    model = tiny_model("sd15", dtype=dtype)
    assert model.model.get_dtype() == dtype
    patched = apply_node(node, model, mode="manual", depth_1_factor=2.0)
    out = forward(patched, (24, 40))
    assert torch.isfinite(out).all()


def test_cond_and_uncond_in_one_sampler_run(node, sd15):
    patched = apply_node(node, sd15, mode="manual", depth_1_factor=2.0, depth_2_factor=2.0)
    unpatched = sample(sd15, (27, 41), steps=2)
    out = sample(patched, (27, 41), steps=2)
    assert out.shape == unpatched.shape and torch.isfinite(out).all()
    assert not torch.equal(out, unpatched)


def test_cond_and_uncond_batched_or_separate_give_the_same_result(node, sd15):
    patched = apply_node(node, sd15, mode="manual", depth_1_factor=2.0, depth_2_factor=2.0)
    together = forward(patched, (27, 41), batch=2, seed=3)
    # The same two samples, one at a time (what ComfyUI does when memory is short).
    import comfy_support

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 27, 41, generator=generator)
    context = torch.randn(2, comfy_support.TEXT_TOKENS, 768, generator=generator)
    sigmas = torch.ones(2)
    options = dict(patched.model_options["transformer_options"], sigmas=sigmas[:1], wrappers=patched.wrappers)
    with torch.no_grad():
        one_by_one = torch.cat(
            [
                patched.model.apply_model(
                    x[i : i + 1], sigmas[:1], c_crossattn=context[i : i + 1], transformer_options=dict(options)
                )
                for i in range(2)
            ]
        )
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-5)


def test_sigma_range_from_the_models_schedule(node, sd15):
    patched = apply_node(node, sd15, mode="manual", depth_1_factor=2.0, start_percent=0.0, end_percent=0.5)
    sampling = sd15.get_model_object("model_sampling")
    early, late = sampling.percent_to_sigma(0.1), sampling.percent_to_sigma(0.9)
    for sigma, expected in ((early, 16 * 16), (late, 32 * 32)):
        probe = Probe()
        forward(patched, (32, 32), batch=1, sigma=sigma, probe=probe)
        assert probe.kv_by_grid()[(32, 32)] == {expected}
