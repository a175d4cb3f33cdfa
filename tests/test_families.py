"""The family table and its one resolver, against sequences built the way each family's model code builds them.

``model_sequences`` below is written from ComfyUI v0.8.0's model code, one
family at a time, without the table or the resolver: for one model call it
lists every attention call's key sequence as labelled segments (text,
registers, padding, references, the image grid, ...). The resolver must find
the grid exactly where the model put it, or stay silent on calls that hold
none; and on every layout it finds, the mass-corrected reduction must equal
the exact oracle.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dit import attention, oracle_keys, random_qkv

from todo_core import ToDoConfig
from todo_core.dit import reduce_keys
from todo_core.families import (
    DIT_FAMILIES,
    LATENT_SCALES,
    STEPS_ASIDE,
    DiTFamily,
    ImagePosition,
    SequenceLayout,
    find_family,
    holds_no_image,
    latent_tokens,
    patch_triple,
    resolve_layout,
    steps_aside,
)

Segments = list[tuple[str, int]]
IMAGE = "image"


def family(name: str, patch: tuple[int, int, int] | None = None, multiple: int | None = None, latent_format: str = ""):
    config = {"pad_tokens_multiple": multiple} if multiple else {}
    return DIT_FAMILIES[name].for_model(config, patch, LATENT_SCALES.get(latent_format, 8), latent_format)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def model_sequences(
    name: str,
    patch: tuple[int, int, int],
    frames: int,
    height: int,
    width: int,
    text: int,
    refs: list[tuple[int, ...]] = (),
    multiple: int = 1,
    extra_after: int = 0,
) -> dict[str, Segments]:
    """Each attention call of one model call, as its model code builds the key sequence (see the module doc).

    ``refs``: shapes of reference latents; ``extra_after``: tokens a Wan S2V /
    HuMo model appends after the video; ``multiple``: Z-Image's padding.
    """
    pt, ph, pw = patch
    grid = ceil_div(frames, pt) * ceil_div(height, ph) * ceil_div(width, pw)
    ref_tokens = sum(ceil_div(s[-2], ph) * ceil_div(s[-1], pw) * (s[2] if len(s) == 5 else 1) for s in refs)
    if name in ("flux", "chroma", "qwen_image"):  # flux/layers.py: cat(txt, img); refs appended to img
        return {"joint": [("text", text), (IMAGE, grid), ("refs", ref_tokens)]}
    if name == "sd3":  # mmdit.py: joint [context, x]; SD3.5's x_block_self_attn over x alone
        return {"joint": [("text", text), (IMAGE, grid)], "image self": [(IMAGE, grid)]}
    if name == "auraflow":  # aura/mmdit.py: c = cat(register_tokens (8), cond); cat([c, x])
        return {"joint": [("registers", 8), ("text", text), (IMAGE, grid)]}
    if name == "lumina2":  # lumina/model.py: cap padded with cap_pad_token, x with x_pad_token, each to `multiple`
        cap = ceil_div(text, multiple) * multiple
        pad = ceil_div(grid, multiple) * multiple - grid
        return {
            "context refiner": [("text", cap)],
            "noise refiner": [(IMAGE, grid), ("x pad", pad)],
            "joint": [("text", cap), (IMAGE, grid), ("x pad", pad)],
        }
    if name == "hidream":  # hidream/model.py: image first; text = T5 + llama31 (+ llama_i per block)
        return {"double": [(IMAGE, grid), ("text", text + 2 * 128)], "single": [(IMAGE, grid), ("text", text + 128)]}
    if name == "omnigen2":  # omnigen2.py: refiners per kind, then [text, ref_1..ref_n, target]
        calls = {"context refiner": [("text", text)], "noise refiner": [(IMAGE, grid)]}
        if ref_tokens:
            calls["ref refiner"] = [("refs", ref_tokens)]
        calls["joint"] = [("text", text), ("refs", ref_tokens), (IMAGE, grid)]
        return calls
    if name == "hunyuan_video":  # hunyuan_video/model.py: token refiner on the text; [ref_latent, img, txt]
        return {"token refiner": [("text", text)], "joint": [("ref latent", ref_tokens), (IMAGE, grid), ("text", text)]}
    if name == "mochi":  # asymm_models_joint.py: cat([x, y[:num_tokens]])
        return {"joint": [(IMAGE, grid), ("text", text)]}
    if name in ("wan", "ltxv", "kandinsky5", "cosmos", "cosmos_predict2"):  # self-attention over the video alone
        calls = {"self": [(IMAGE, grid), ("appended", extra_after)]}
        if name == "kandinsky5":
            calls["text encoder"] = [("text", text)]
        return calls
    raise KeyError(name)


REFINER_MODULES = {
    "lumina2": {"context refiner": "context_refiner.0"},
    "omnigen2": {"context refiner": "context_refiner.0", "ref refiner": "ref_image_refiner.0"},
    "hunyuan_video": {"token refiner": "txt_in"},
    "kandinsky5": {"text encoder": "text_transformer_blocks.0"},
}
"""The modules that make a family's calls over text or references alone (as ComfyUI v0.8.0 names them)."""


def expected_layout(segments: Segments, frames: int, height: int, width: int) -> SequenceLayout | None:
    labels = [label for label, _ in segments]
    if IMAGE not in labels:
        return None
    at = labels.index(IMAGE)
    prefix = sum(n for _, n in segments[:at])
    suffix = sum(n for _, n in segments[at + 1 :])
    return SequenceLayout(prefix, frames, height, width, suffix)


def grid_of(fam: DiTFamily, frames: int, height: int, width: int) -> tuple[int, int, int]:
    pt, ph, pw = fam.patch_size
    return ceil_div(frames, pt), ceil_div(height, ph), ceil_div(width, pw)


CASES = [
    # (family, patch, latent format, multiple, frames, latent h, latent w, text, reference shapes, appended)
    ("flux", None, "", None, 1, 18, 26, 5, [], 0),
    ("flux", (1, 1, 1), "Flux2", None, 1, 17, 9, 512, [(1, 128, 8, 6), (1, 128, 5, 5)], 0),  # Flux.2 with 2 refs
    ("flux", None, "", None, 1, 16, 16, 77, [(1, 16, 16, 16)], 0),  # Kontext
    ("chroma", None, "", None, 1, 19, 21, 7, [], 0),
    ("chroma", (1, 16, 16), "ChromaRadiance", None, 1, 200, 150, 7, [], 0),  # pixels, patch 16
    ("sd3", None, "", None, 1, 18, 26, 154, [], 0),
    ("auraflow", None, "", None, 1, 18, 26, 256, [], 0),
    ("qwen_image", None, "", None, 1, 18, 26, 9, [(1, 16, 1, 18, 26)], 0),
    ("lumina2", None, "", None, 1, 18, 26, 5, [], 0),  # Lumina 2: no padding
    ("lumina2", None, "", 32, 1, 18, 26, 5, [], 0),  # Z-Image: 5 -> 32 text, 117 -> 128 image
    ("lumina2", None, "", 32, 1, 16, 16, 64, [], 0),  # Z-Image: both runs already whole
    ("hidream", None, "", None, 1, 18, 26, 128, [], 0),
    ("omnigen2", None, "", None, 1, 18, 26, 11, [(1, 16, 14, 10), (1, 16, 9, 9)], 0),
    ("omnigen2", None, "", None, 1, 18, 26, 11, [], 0),
    ("hunyuan_video", None, "", None, 5, 18, 26, 9, [], 0),
    ("hunyuan_video", None, "", None, 3, 16, 20, 9, [(1, 16, 1, 16, 20)], 0),  # reference latent before the video
    ("hunyuan_video", (1, 1, 1), "HunyuanVideo15", None, 3, 15, 17, 40, [], 0),
    ("hunyuan_video", (1, 1, 1), "HunyuanImage21", None, 1, 32, 48, 40, [], 0),
    ("mochi", None, "", None, 4, 18, 26, 30, [], 0),
    ("wan", None, "", None, 3, 18, 26, 12, [], 0),
    ("wan", None, "", None, 3, 18, 26, 12, [], 2 * 9 * 13 + 97),  # S2V: reference frames and motion tokens after
    ("ltxv", None, "", None, 4, 9, 13, 20, [], 0),
    ("ltxv", None, "LTXAV", None, 4, 9, 13, 20, [], 0),
    ("kandinsky5", None, "", None, 3, 18, 26, 20, [], 0),
    ("kandinsky5", None, "Flux", None, 1, 18, 26, 20, [], 0),  # Kandinsky 5 Image
    ("cosmos", None, "", None, 2, 18, 26, 20, [], 0),
    ("cosmos_predict2", None, "", None, 1, 18, 26, 20, [], 0),
]


def case_id(case) -> str:
    name, _, latent_format, multiple, frames, h, w, text, refs, after = case
    return f"{latent_format or name}-{frames}x{h}x{w}-t{text}-r{len(refs)}-m{multiple or 1}-a{after}"


def run_case(case):
    """(call kind, tokens, expected layout, resolved layout, silent) for every call of one case's model call."""
    name, patch, latent_format, multiple, frames, h, w, text, refs, after = case
    fam = family(name, patch, multiple, latent_format)
    modules = REFINER_MODULES.get(name, {})
    shape = (1, 16, frames, h, w) if frames > 1 or fam.video else (1, 16, h, w)
    inputs = {fam.references_before: [torch.zeros(s) for s in refs]} if fam.references_before and refs else {}
    latent = fam.latent_info(shape, text, inputs)
    grid = grid_of(fam, frames, h, w)
    results = []
    for kind, segments in model_sequences(
        name, fam.patch_size, frames, h, w, text, refs, fam.token_multiple, after
    ).items():
        tokens = sum(n for _, n in segments)
        expected = expected_layout(segments, *grid)
        # The node flags a refiner module's calls: they never reach the resolver.
        silent = holds_no_image(tokens, latent, fam) or (kind in modules and fam.flags(modules[kind]))
        results.append((kind, tokens, expected, resolve_layout(tokens, latent, fam), silent))
    return results


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_resolver_finds_the_grid_where_the_model_puts_it(case):
    for kind, tokens, expected, resolved, silent in run_case(case):
        if expected is None:
            assert silent, f"{kind}: {tokens} tokens hold no image, and pass silently"
            assert resolved is None or kind in REFINER_MODULES.get(case[0], {}), kind
        else:
            assert resolved == expected, f"{kind} ({tokens} tokens)"


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_layout_of_the_table_meets_the_oracle(case, factor):
    for _, _, expected, _, _ in run_case(case):
        if expected is None or expected.tokens > 2500:
            continue
        q, k, v = random_qkv(expected, heads=1, dim=4)
        temporal = 2 if expected.frames > 1 else 1
        k_small, v_small, mask = reduce_keys(k, v, None, expected, factor, sequence_dim=2, temporal_factor=temporal)
        positions = oracle_keys(expected, factor, temporal)
        reference = attention(q, k[:, :, positions], v[:, :, positions])
        torch.testing.assert_close(attention(q, k_small, v_small, mask), reference, rtol=1e-10, atol=1e-10)


def test_z_image_counts_padding_after_the_grid_and_on_the_text():
    fam = family("lumina2", multiple=32)
    latent = fam.latent_info((1, 16, 152, 104), 77, {})  # 1216 x 832: 76 x 52 = 3952 tokens + 16 padding
    assert latent.text_tokens == 96
    assert resolve_layout(96 + 3952 + 16, latent, fam) == SequenceLayout(96, 1, 76, 52, 16)
    assert resolve_layout(3952 + 16, latent, fam) == SequenceLayout(0, 1, 76, 52, 16)
    assert resolve_layout(96, latent, fam) is None and holds_no_image(96, latent, fam)


def test_hidream_e1_grid_spans_target_and_source_side_by_side():
    fam = family("hidream")
    latent = fam.latent_info((1, 16, 18, 26), 128, {"image_cond": torch.zeros(1, 16, 18, 26)})
    assert (latent.height, latent.width) == (18, 52)
    assert resolve_layout(9 * 26 + 384, latent, fam) == SequenceLayout(0, 1, 9, 26, 384)


def test_ltx_guide_frames_with_dropped_tokens_keep_the_whole_frames_first():
    """LTXVAddGuide appends guide frames and drops the tokens of denoise_mask < 0: whole frames first, rest kept."""
    fam = family("ltxv")
    latent = fam.latent_info((1, 128, 5, 9, 13), 20, {})
    per_frame = 9 * 13
    assert resolve_layout(4 * per_frame + 50, latent, fam) == SequenceLayout(0, 4, 9, 13, 50)
    assert resolve_layout(5 * per_frame, latent, fam) == SequenceLayout(0, 5, 9, 13, 0)


def test_a_call_that_does_not_hold_the_grid_is_reported_not_placed():
    fam = family("flux")
    latent = fam.latent_info((1, 16, 18, 26), 5, {})
    assert resolve_layout(5 + 50, latent, fam) is None  # shorter than the grid after the text
    assert not holds_no_image(5 + 50, latent, fam)  # and not a text-only call: the override warns


# --- hypothesis: random families, sizes, texts, references ----------------------------------------------------------

FAMILY_SHAPES = {
    "flux": [None, (1, 1, 1)],
    "chroma": [None],
    "sd3": [None],
    "auraflow": [None],
    "qwen_image": [None],
    "lumina2": [None],
    "hidream": [None],
    "omnigen2": [None],
    "hunyuan_video": [None, (1, 1, 1)],
    "mochi": [None],
    "wan": [None],
    "ltxv": [None],
    "kandinsky5": [None],
    "cosmos": [None],
    "cosmos_predict2": [None],
}


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(FAMILY_SHAPES)),
    patch_choice=st.integers(0, 1),
    multiple=st.sampled_from([None, 32]),
    frames=st.integers(1, 4),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    text=st.integers(1, 300),
    ref_sides=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), max_size=2),
    appended=st.integers(0, 80),
)
def test_any_layout_a_family_builds_is_placed_exactly(
    name, patch_choice, multiple, frames, height, width, text, ref_sides, appended
):
    patches = FAMILY_SHAPES[name]
    patch = patches[patch_choice % len(patches)]
    fam_video = DIT_FAMILIES[name].video
    frames = frames if fam_video else 1
    if name != "lumina2":
        multiple = None
    if name not in ("wan",):
        appended = 0
    refs: list[tuple[int, ...]] = []
    if name in ("flux", "omnigen2"):
        refs = [(1, 16, h, w) for h, w in ref_sides]
    elif name == "hunyuan_video" and ref_sides:
        refs = [(1, 16, 1, height, width)]
    case = (name, patch, "", multiple, frames, height, width, text, refs, appended)
    fam = family(name, patch, multiple)
    _, grid_h, grid_w = grid_of(fam, frames, height, width)
    for kind, tokens, expected, resolved, silent in run_case(case):
        if expected is None:
            assert silent
            continue
        # Two reference grids or texts can by chance be exactly as long as the image: what any resolver must
        # then do is place a grid of the image's shape there, which is what these calls' shapes allow.
        if kind in ("ref refiner", "context refiner", "text encoder", "token refiner"):
            continue
        if DIT_FAMILIES[name].image_only and expected.suffix >= grid_h * grid_w:
            continue  # appended tokens that happen to fill whole frames are read as frames
        assert resolved == expected, (kind, tokens)


# --- every size: the placed grid is the model's, auto is a no-op at the native size -----------------------------------

IMAGE_FAMILIES = [
    ("flux", None, ""),
    ("flux", (1, 1, 1), "Flux2"),
    ("chroma", None, ""),
    ("chroma", (1, 16, 16), "ChromaRadiance"),
    ("sd3", None, ""),
    ("auraflow", None, ""),
    ("qwen_image", None, ""),
    ("lumina2", None, ""),
    ("hidream", None, ""),
    ("omnigen2", None, ""),
    ("hunyuan_video", (1, 1, 1), "HunyuanImage21"),
    ("kandinsky5", None, "Flux"),
    ("cosmos_predict2", None, ""),
]


@pytest.mark.parametrize(("name", "patch", "latent_format"), IMAGE_FAMILIES, ids=lambda v: str(v))
def test_every_size_from_256_to_2048_is_placed_and_budgeted(name, patch, latent_format):
    fam = family(name, patch, 32 if name == "lumina2" else None, latent_format)
    scale = fam.latent_scale
    native_w, native_h = fam.native_size
    for size in range(256, 2049, 16):
        for width_px, height_px in ((size, size), (size, max(256, size * 9 // 16 // 16 * 16))):
            height, width = height_px // scale, width_px // scale
            latent = fam.latent_info((1, 16, height, width), 77, {})
            _, grid_h, grid_w = grid_of(fam, 1, height, width)
            image = grid_h * grid_w
            padding = -image % fam.token_multiple
            if fam.image_position is ImagePosition.AFTER_TEXT:
                tokens, prefix = latent.text_tokens + image + padding, latent.text_tokens
            else:
                tokens, prefix = image + 300, 0
            layout = resolve_layout(tokens, latent, fam)
            assert layout is not None and (layout.prefix, layout.height, layout.width) == (prefix, grid_h, grid_w)
            factor = ToDoConfig.create().image_token_factor(grid_h, grid_w, fam.native_tokens)
            kept = math.ceil(grid_h / factor - 1e-9) * math.ceil(grid_w / factor - 1e-9)
            assert kept <= max(fam.native_tokens, 1) or factor == 1
            if (width_px, height_px) == (native_w, native_h) or width_px * height_px <= native_w * native_h:
                assert factor == 1, (width_px, height_px)


# --- the table -----------------------------------------------------------------------------------------------------


def test_every_family_has_its_classes_a_label_and_a_native_size():
    seen: set[str] = set()
    for name, fam in DIT_FAMILIES.items():
        assert fam.name == name and fam.label and fam.class_paths
        assert not seen & set(fam.class_paths), "a class belongs to one family"
        seen |= set(fam.class_paths)
        assert all(side >= 256 for side in fam.native_size)
    assert not seen & set(STEPS_ASIDE)


def test_find_family_walks_the_class_hierarchy():
    ltx2 = ["comfy.ldm.lightricks.av_model.LTXAVModel", "comfy.ldm.lightricks.model.LTXVModel", "torch.nn.Module"]
    assert find_family(ltx2).name == "ltxv"
    radiance = ["comfy.ldm.chroma_radiance.model.ChromaRadiance", "comfy.ldm.chroma.model.Chroma"]
    assert find_family(radiance).name == "chroma"
    assert find_family(["comfy.ldm.aura.mmdit.MMDiT"]).name == "auraflow"
    assert find_family(["comfy.ldm.modules.diffusionmodules.mmdit.MMDiT"]).name == "sd3"
    assert find_family(["comfy.ldm.pixart.pixartms.PixArtMS"]) is None
    assert steps_aside(["comfy.ldm.pixart.pixartms.PixArtMS"])[0].startswith("PixArt")


@pytest.mark.parametrize(
    ("name", "config", "latent_format", "native", "video", "label"),
    [
        ("lumina2", {"pad_tokens_multiple": 32}, "Flux", (1024, 1024), False, "Z-Image"),
        ("hunyuan_video", {}, "HunyuanImage21", (2048, 2048), False, "HunyuanImage 2.1"),
        ("hunyuan_video", {}, "HunyuanVideo15", (1280, 720), True, "HunyuanVideo 1.5"),
        ("hunyuan_video", {}, "HunyuanVideo", (1280, 720), True, "HunyuanVideo 1.0 / 1.5, HunyuanImage 2.1"),
        ("ltxv", {}, "LTXAV", (1280, 720), True, "LTX-2"),
        ("kandinsky5", {}, "Flux", (1024, 1024), False, "Kandinsky 5 Image"),
        ("wan", {"out_dim": 48}, "Wan22", (1280, 704), True, "Wan 2.2 TI2V 5B"),
    ],
)
def test_members_of_a_family_get_their_own_native_size(name, config, latent_format, native, video, label):
    fam = DIT_FAMILIES[name].for_model(config, None, LATENT_SCALES.get(latent_format, 8), latent_format)
    assert (fam.native_size, fam.video, fam.label) == (native, video, label)


def test_pixels_per_token_per_latent_format():
    assert family("flux", (1, 1, 1), latent_format="Flux2").pixels_per_token == (16, 16)
    assert family("chroma", (1, 16, 16), latent_format="ChromaRadiance").pixels_per_token == (16, 16)
    assert family("ltxv", (1, 1, 1), latent_format="LTXV").pixels_per_token == (32, 32)
    assert family("hunyuan_video", (1, 1, 1), latent_format="HunyuanImage21").native_tokens == 64 * 64
    assert family("lumina2", multiple=32).native_tokens == 64 * 64


def test_flags_match_module_names_by_pattern():
    kandinsky = DIT_FAMILIES["kandinsky5"]
    assert kandinsky.flags("text_transformer_blocks.0.self_attention")
    assert kandinsky.flags("visual_transformer_blocks.3.cross_attention")
    assert not kandinsky.flags("visual_transformer_blocks.3.self_attention")
    ltx = DIT_FAMILIES["ltxv"]
    assert ltx.flags("transformer_blocks.0.audio_to_video_attn") and not ltx.flags("transformer_blocks.0.attn1")


def test_patch_sizes_as_models_report_them():
    assert patch_triple(2) == (1, 2, 2)
    assert patch_triple([1, 1]) == (1, 1, 1)
    assert patch_triple((1, 2, 2)) == (1, 2, 2)
    assert patch_triple(None) is None and patch_triple("2") is None
    assert latent_tokens((1, 16, 3, 17, 9), (1, 2, 2)) == 3 * 9 * 5
