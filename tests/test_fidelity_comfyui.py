"""Fidelity mode (and the error report) through ComfyUI's real sampler, on tiny models of every supported family.

Every attention call is journalled twice: when ToDo decides its factor
(``Calibration.decide`` of the node's own module, wrapped) and when the call
reaches the attention backend (an override registered before ToDo, which ToDo
calls with the keys it kept). A decision is followed by its call, so the keys
the backend counts can be checked against the decision the render's report is
built from, call by call. The renders' calibrations are taken as each render
closes them (``CalibrationStore.close``, wrapped), with the one INFO line each
logs.

Random-weight tiny models attend diffusely over random values: dropping keys
changes their attention a lot, so the loose budget here is large (0.5, the
largest the node accepts) and the tight one (0.001, the smallest) reduces
nothing; both answers are asserted.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field

import pytest
import tiny_image_dits
import tiny_video_dits
import torch
from comfy_support import apply_node, import_comfyui, random_patcher, tiny_model
from dit_support import LazyModels, sample_dit, tiny_dit, with_probe

pytestmark = pytest.mark.comfyui

LOGGER = "comfyui_todo"
LOOSE, TIGHT = 0.5, 0.001
"""The node's largest and smallest ``max_error``."""
UNET_TEXT_TOKENS = 7
UNET_SIZE = (16, 16)
"""Latent cells of the UNet renders: 16 x 16, 8 x 8 and 4 x 4 attention grids."""
FRAMES = 3

STEPPING_ASIDE = {"pixart", "hunyuan_dit", "stable_cascade_c"}
IMAGE_FAMILIES = sorted(set(tiny_image_dits.TINY_IMAGE_DITS) - STEPPING_ASIDE)
"""The tiny image DiTs ToDo acts on (PixArt, HunyuanDiT and Stable Cascade step aside)."""
VIDEO_FAMILIES = sorted(tiny_video_dits.TINY_VIDEO_DITS)
BEYOND_LOOSE = {
    "qwen_image",
    "chroma_radiance",
    "lumina2",
    "hunyuan_image21_refiner",
    "omnigen2",
    "cosmos_predict2",
    "cosmos",
    "cosmos_predict2_video",
    "hunyuan_video",
    "kandinsky5",
    "mochi",
}
"""Tiny random models whose smallest reduction already changes attention by more than 50 % in every layer at these
sizes (measured 53 to 98 %): even the loosest budget keeps every key, and the report says what a reduction would
cost. Trained models attend far more sharply."""
FAMILIES = [
    ("unet", "sd15"),
    ("unet", "sdxl"),
    *(("dit", kind) for kind in ("flux", "sd3", "qwen_image", "wan")),
    *(("image", kind) for kind in IMAGE_FAMILIES),
    *(("video", kind) for kind in VIDEO_FAMILIES),
]


# --- the journal: decisions and backend calls, in the order they happen ----------------------------------------------


@dataclass(frozen=True)
class Decide:
    key: object
    factor: float
    fresh: bool
    """Measured (or fallen back) now: the key had no decision in this render yet."""
    calibration: object


@dataclass(frozen=True)
class Attend:
    q: int
    kv: int
    batch: int
    mask: tuple[int, ...] | None
    calibrated: bool
    """The call's transformer_options held the render's calibration (the model-call wrapper handed it over)."""


@dataclass
class Journal:
    events: list = field(default_factory=list)
    renders: list = field(default_factory=list)
    """Calibrations in the order their renders ended."""

    def decisions(self) -> list[Decide]:
        return [e for e in self.events if isinstance(e, Decide)]

    def measured(self) -> int:
        return sum(1 for e in self.decisions() if e.fresh)

    def clear(self) -> None:
        self.events.clear()
        self.renders.clear()


class JournalProbe:
    """``optimized_attention_override`` registered before ToDo: journals what the backend gets, then attends."""

    passes_attention_masks = True  # it hands every mask to the backend: ToDo's correction stays a mask

    def __init__(self, journal: Journal, compute: bool = True) -> None:
        self.journal = journal
        self.compute = compute
        """False skips the attention itself (zeros out): the ``meta`` device has shapes, no memory statistics."""

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options: every clone journals here

    def __call__(self, attention, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        dim = 2 if kwargs.get("skip_reshape", False) else 1
        mask = args[1] if len(args) >= 2 else kwargs.get("mask")
        self.journal.events.append(
            Attend(
                q.shape[dim],
                k.shape[dim],
                q.shape[0],
                None if mask is None else tuple(mask.shape),
                "todo_calibration" in options,
            )
        )
        if not self.compute:
            return torch.zeros_like(q)
        return attention(q, k, v, *args, **kwargs)


def calibrate_module(node):
    """``todo_core.calibrate`` as the node loaded by ComfyUI imports it (not this test's own import of it)."""
    return sys.modules[sys.modules[node.__module__].CalibrationStore.__module__]


@pytest.fixture
def journal(node, monkeypatch) -> Journal:
    calibrate = calibrate_module(node)
    kept = Journal()
    decide, lookup, close = calibrate.Calibration.decide, calibrate.Calibration.lookup, calibrate.CalibrationStore.close

    def journalled_decide(self, key, measure, fallback):
        fresh = key not in self.decisions
        factor = decide(self, key, measure, fallback)
        kept.events.append(Decide(key, factor, fresh, self))
        return factor

    def journalled_lookup(self, key):  # UNets: a decided layer is reduced by the attn1 patch, before the projections
        factor = lookup(self, key)
        if factor is not None:
            kept.events.append(Decide(key, factor, False, self))
        return factor

    def journalled_close(self, calibration):
        kept.renders.append(calibration)
        close(self, calibration)

    monkeypatch.setattr(calibrate.Calibration, "decide", journalled_decide)
    monkeypatch.setattr(calibrate.Calibration, "lookup", journalled_lookup)
    monkeypatch.setattr(calibrate.CalibrationStore, "close", journalled_close)
    return kept


def probed(model, journal: Journal, compute: bool = True):
    """A clone of ``model`` whose attention calls are journalled (apply ToDo to it: the probe is then inside)."""
    return with_probe(model, JournalProbe(journal, compute))[0]


REPORT = re.compile(r"keys kept (\d+)% of ([\d,]+) over ([\d,]+) attention calls")


def report_lines(caplog, mode: str = "fidelity") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.INFO and r.getMessage().startswith(f"ToDo {mode}")
    ]


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def check_render(journal: Journal, calibration, line: str | None = None) -> list[tuple[Decide, Attend]]:
    """Every decision of ``calibration`` against the call that followed it at the backend; the report against both.

    Returns the (decision, backend call) pairs.
    """
    events = journal.events
    pairs = []
    for index, event in enumerate(events):
        if isinstance(event, Decide) and event.calibration is calibration:
            call = events[index + 1]
            assert isinstance(call, Attend), "a decision not followed by its attention call"
            decision = calibration.decisions[event.key]
            assert event.factor == decision.factor
            assert call.kv == decision.kept, (event.key, decision, call)
            assert call.calibrated
            if decision.factor > 1:
                assert call.kv < decision.tokens, (event.key, decision, call)
            else:
                assert call.kv == decision.tokens or decision.kept < decision.tokens  # temporal-only reduction
            pairs.append((event, call))
    assert pairs, "nothing was decided in this render"
    assert len(pairs) == sum(calibration.calls.values())
    assert {e.key for e, _ in pairs} == set(calibration.decisions)
    if line is not None:
        match = REPORT.search(line)
        assert match, line
        kept = sum(call.kv for _, call in pairs)
        total = sum(calibration.decisions[e.key].tokens for e, _ in pairs)
        assert int(match.group(2).replace(",", "")) == total
        assert int(match.group(3).replace(",", "")) == len(pairs)
        assert int(match.group(1)) == round(100 * kept / total)
    return pairs


# --- models and renders ---------------------------------------------------------------------------------------------


def build(key: tuple[str, str]):
    group, kind = key
    if group == "unet":
        return tiny_model(kind)
    if group == "dit":
        return tiny_dit(kind)
    if group == "image":
        return tiny_image_dits.build(kind)
    return tiny_video_dits.build(kind)


@pytest.fixture(scope="module")
def models():
    import_comfyui()
    return LazyModels(build)


def unet_conditioning(patcher, seed: int, negative_tokens: int = UNET_TEXT_TOKENS):
    generator = torch.Generator().manual_seed(seed)
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    extra = {"pooled_output": torch.randn(1, 1280, generator=generator)} if patcher.model.adm_channels else {}
    positive = [[torch.randn(1, UNET_TEXT_TOKENS, context_dim, generator=generator), dict(extra)]]
    negative = [[torch.randn(1, negative_tokens, context_dim, generator=generator), dict(extra)]]
    return positive, negative


def unet_render(
    patcher, hw=UNET_SIZE, steps=1, cfg=7.0, batch=1, seed=0, negative_tokens=UNET_TEXT_TOKENS, denoise=1.0
):
    """ComfyUI's sampler (Euler) on a tiny UNet; ``negative_tokens`` other than 7 runs cond and uncond apart."""
    import comfy.sample

    positive, negative = unet_conditioning(patcher, seed, negative_tokens)
    generator = torch.Generator().manual_seed(seed + 1)
    latent = torch.randn(batch, 4, *hw, generator=generator) if denoise < 1 else torch.zeros(batch, 4, *hw)
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        "euler",
        "normal",
        positive,
        negative,
        latent,
        denoise=denoise,
        disable_pbar=True,
        seed=seed,
    )


def odd_size(group: str, kind: str) -> tuple[int, int]:
    """A latent size whose token grid no factor divides evenly, that the family accepts."""
    if group == "image":
        tiny = tiny_image_dits.TINY_IMAGE_DITS[kind]
        if kind == "chroma_radiance":
            return 55, 79
        return (9, 13) if tiny.patch == (1, 1) and tiny.divisor == 1 else (18, 26)
    if group == "video":
        tiny = tiny_video_dits.TINY_VIDEO_DITS[kind]
        if tiny.min_size > 6:
            return 10, 14
        return (9, 13) if tiny.spatial_multiple == 1 else (6, 10)
    return 18, 26


def render(key: tuple[str, str], model, size=None, batch: int = 1, cfg: float = 1.0, steps: int = 1, **extras):
    group, kind = key
    if group == "unet":
        return unet_render(model, size or UNET_SIZE, steps=steps, cfg=cfg, batch=batch, **extras)
    height, width = size or odd_size(group, kind)
    if group == "dit":
        return sample_dit(model, height, width, batch=batch, steps=steps, cfg=cfg, **extras)
    if group == "image":
        return tiny_image_dits.sample(model, kind, height, width, batch=batch, cfg=cfg, steps=steps, **extras)
    return tiny_video_dits.sample(model, kind, height, width, FRAMES, batch=batch, cfg=cfg, steps=steps, **extras)


def finite(latent) -> bool:
    return tiny_video_dits.finite(latent)


# --- 1. every family: one report per render, the backend's keys are the report's decisions --------------------------


@pytest.mark.parametrize("key", FAMILIES, ids=lambda key: key[1])
def test_fidelity_on_every_family_reports_once_and_the_backend_keys_match(node, models, journal, caplog, key):
    """A loose budget reduces some layers, the tightest reduces none; the backend sees exactly what was decided."""
    base = probed(models[key], journal)
    reduced = {}
    for budget in (LOOSE, TIGHT):
        journal.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            out = render(key, apply_node(node, base, mode="fidelity", max_error=budget))
        assert finite(out)
        lines = report_lines(caplog)
        assert len(lines) == 1 and len(journal.renders) == 1, lines
        assert f"(max_error {budget:.3g})" in lines[0]
        assert not todo_warnings(caplog)
        calibration = journal.renders[0]
        pairs = check_render(journal, calibration, lines[0])
        assert all(e.fresh for e, _ in pairs[: len(calibration.decisions)]), "each key measured on its first call"
        assert journal.measured() == len(calibration.decisions)
        reduced[budget] = sum(1 for e, _ in pairs if e.factor > 1)
        if budget == TIGHT or key[1] in BEYOND_LOOSE:
            assert all(d.factor == 1 for d in calibration.decisions.values()), lines[0]
            costs = [float(c) for c in re.findall(r"the smallest reduction would cause ([\d.]+)%", lines[0])]
            assert costs and all(c > 100 * budget for c in costs), lines[0]
            assert all(a.kv == calibration.decisions[e.key].tokens for e, a in pairs)
        else:
            assert all(d.error <= budget for d in calibration.decisions.values())
    assert (reduced[LOOSE] > 0) == (key[1] not in BEYOND_LOOSE), "the loose budget reduces some layer"
    assert reduced[TIGHT] == 0


# --- 2. decisions never shared -----------------------------------------------------------------------------------


def test_wan_vace_blocks_are_layers_of_their_own(node, models, journal):
    """Wan VACE's blocks run under the block index of the main block they follow (``wan/model.py``): each gets a
    decision measured on its own attention, not the main block's."""
    key = ("video", "wan_vace")
    render(key, apply_node(node, probed(models[key], journal), mode="fidelity", max_error=LOOSE))
    calibration = journal.renders[0]
    pairs = check_render(journal, calibration)
    assert len(pairs) == 3 and all(e.fresh for e, _ in pairs), "main block 0, its VACE block, main block 1"
    assert {k.layer for k in calibration.decisions} == {("double", 0), ("double", 0, 1), ("double", 1)}
    assert {k.group for k in calibration.decisions} == {("double", 0), ("double", 1)}, "reported by block index"


def test_each_render_measures_again_and_decides_alike(node, sd15, journal, caplog):
    patched = apply_node(node, probed(sd15, journal), mode="fidelity", max_error=0.3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = unet_render(patched)
        second = unet_render(patched)
    assert len(journal.renders) == 2 and len(report_lines(caplog)) == 2
    one, two = journal.renders
    assert one is not two and one.decisions == two.decisions, "the same model and inputs decide the same"
    assert journal.measured() == len(one.decisions) + len(two.decisions), "the second render measured again"
    assert one.seconds > 0 and two.seconds > 0
    assert torch.equal(first, second)


def test_a_weight_patched_clone_and_another_model_measure_their_own(node, sd15, sdxl, journal, caplog):
    """One node output rendered as it is and with a LoRA-like weight patch; another model beside it."""
    patched = apply_node(node, probed(sd15, journal), mode="fidelity", max_error=0.3)
    lora = patched.clone()
    weights = {k: v for k, v in lora.model.diffusion_model.state_dict().items() if k.endswith("attn1.to_k.weight")}
    generator = torch.Generator().manual_seed(5)
    lora.add_patches({f"diffusion_model.{k}": (torch.randn(v.shape, generator=generator),) for k, v in weights.items()})
    other = apply_node(node, probed(sdxl, journal), mode="fidelity", max_error=0.3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        unet_render(patched)
        unet_render(lora)
        unet_render(other)
    lines = report_lines(caplog)
    assert len(lines) == 3 and "SD15 UNet" in lines[0] and "SD15 UNet" in lines[1] and "SDXL UNet" in lines[2]
    plain, patched_weights, sdxl_calibration = journal.renders
    for calibration, line in zip(journal.renders, lines, strict=True):
        check_render(journal, calibration, line)
    assert set(plain.decisions) == set(patched_weights.decisions)
    assert journal.measured() == sum(len(c.decisions) for c in journal.renders)
    errors = [(plain.decisions[k].error, patched_weights.decisions[k].error) for k in plain.decisions]
    assert any(a != b for a, b in errors), "the weight patch changes what attention measures"
    assert sdxl_calibration.label == "SDXL UNet" and {k.group for k in sdxl_calibration.decisions} == {
        ("depth", 2),
        ("depth", 3),
    }


def test_cond_and_uncond_apart_are_measured_apart(node, sd15, journal, caplog):
    """Texts of 7 and 11 tokens cannot be batched (ComfyUI pads at most 4x): cond and uncond run apart."""
    patched = apply_node(node, probed(sd15, journal), mode="fidelity", max_error=0.3)
    unet_render(patched)
    unet_render(patched, negative_tokens=11)
    together, apart = journal.renders
    check_render(journal, together)
    pairs = check_render(journal, apart)
    batched = {key.branch for key in together.decisions}
    branches = {key.branch for key in apart.decisions}
    assert len(batched) == 1 and len(next(iter(batched))) == 2, batched
    assert branches == {(0,), (1,)}
    assert {call.batch for _, call in pairs} == {1}
    assert len(apart.decisions) == 2 * len(together.decisions), "each branch measured on its own outputs"
    layers = {(k.layer, k.grid, k.band) for k in apart.decisions}
    assert len(layers) == len(together.decisions)


# --- 3. batch and CFG layouts; masks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [("unet", "sd15"), ("unet", "sdxl"), ("dit", "flux"), ("image", "zimage")], ids=lambda key: key[1]
)
def test_batch_two_with_cfg_is_measured_over_the_whole_batch(node, models, journal, key):
    patched = apply_node(node, probed(models[key], journal), mode="fidelity", max_error=LOOSE)
    out = render(key, patched, batch=2, cfg=3.0)
    assert finite(out) and out.shape[0] == 2
    calibration = journal.renders[0]
    pairs = check_render(journal, calibration)
    assert {call.batch for _, call in pairs} == {4}, "cond and uncond of two images in one call"
    assert {len(k.branch) for k in calibration.decisions} == {2}, "one decision for the batched branches"
    if key[0] == "unet":
        assert any(e.factor > 1 for e, _ in pairs)
    if key == ("image", "zimage"):
        assert any(call.mask is not None for _, call in pairs), "Z-Image's text mask reaches the measured calls"


@pytest.mark.parametrize(
    ("key", "extras"),
    [
        (("image", "zimage"), {"batch": 2, "cfg": 2.0}),
        (("video", "hunyuan_video15"), {"masked_text": 2}),
        (("video", "ltxv"), {"masked_text": 2, "cfg": 2.0}),
        (("video", "hunyuan_video"), {"masked_text": 2}),
    ],
    ids=["zimage", "hunyuan_video15", "ltxv", "hunyuan_video"],
)
def test_joint_attention_with_text_masks_is_measured_with_the_mask(node, models, journal, key, extras):
    """Families that pass an attention mask: the measured calls carry it, and the backend gets what was decided."""
    patched = apply_node(node, probed(models[key], journal), mode="fidelity", max_error=LOOSE)
    assert finite(render(key, patched, **extras))
    pairs = check_render(journal, journal.renders[0])
    masked = [(e, call) for e, call in pairs if call.mask is not None]
    assert masked, "the family's text mask reaches the measured calls"
    assert all(call.mask[-1] == call.kv for _, call in masked), "the mask reduced with the keys"
    assert any(e.factor > 1 for e, _ in pairs) == (key[1] not in BEYOND_LOOSE)


# --- 4. hires fix --------------------------------------------------------------------------------------------------


def test_hires_fix_second_pass_recalibrates_for_its_grid(node, sd15, journal, caplog):
    """txt2img at one size, then img2img at twice the side (a latent upscale and a second KSampler)."""
    import comfy.utils

    patched = apply_node(node, probed(sd15, journal), mode="fidelity", max_error=0.3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        low = unet_render(patched, (12, 12), steps=2)
        upscaled = comfy.utils.common_upscale(low, 24, 24, "nearest-exact", "disabled")
        import comfy.sample

        positive, negative = unet_conditioning(patched, 0)
        noise = torch.randn(upscaled.shape, generator=torch.Generator().manual_seed(9))
        high = comfy.sample.sample(
            patched, noise, 2, 7.0, "euler", "normal", positive, negative, upscaled, denoise=0.5, disable_pbar=True
        )
    assert torch.isfinite(high).all() and high.shape[-2:] == (24, 24)
    lines = report_lines(caplog)
    assert len(lines) == 2
    first, second = journal.renders
    check_render(journal, first, lines[0])
    check_render(journal, second, lines[1])
    assert {k.grid for k in first.decisions if k.group == ("depth", 1)} == {(12, 12)}
    assert {k.grid for k in second.decisions if k.group == ("depth", 1)} == {(24, 24)}
    assert journal.measured() == len(first.decisions) + len(second.decisions)
    totals = [int(REPORT.search(line).group(2).replace(",", "")) for line in lines]
    assert totals[1] == 4 * totals[0], "the second report counts the keys of the larger grids"


# --- 5. determinism ----------------------------------------------------------------------------------------------


def test_identical_renders_are_bit_identical_and_the_global_rng_is_untouched(node, sd15):
    patched = apply_node(node, sd15, mode="fidelity", max_error=0.3)
    torch.manual_seed(1234)
    plain = unet_render(sd15, steps=2)
    after_plain = torch.get_rng_state()
    torch.manual_seed(1234)
    first = unet_render(patched, steps=2)
    after_fidelity = torch.get_rng_state()
    second = unet_render(patched, steps=2)
    assert torch.equal(after_plain, after_fidelity), "measuring drew from torch's global generator"
    assert torch.equal(first, second)
    assert not torch.equal(first, plain)


# --- 6. the error report in auto and manual modes -------------------------------------------------------------------


def test_without_report_auto_keeps_the_attn1_patch_and_measures_nothing(node, sd15, journal, caplog):
    from comfy.patcher_extension import WrappersMP

    inputs = {"mode": "auto", "native_resolution": 64}  # an 8 x 8 latent is native: factor 2 at 16 x 16
    patched = apply_node(node, sd15, **inputs)
    explicit = apply_node(node, sd15, **inputs, report_error=False, max_error=0.2)
    for model in (patched, explicit):
        options = model.model_options["transformer_options"]
        assert [type(p).__name__ for p in options["patches"]["attn1_patch"]] == ["ToDoAttn1Patch"]
        assert "optimized_attention_override" not in options
        assert not model.wrappers.get(WrappersMP.OUTER_SAMPLE)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = unet_render(probed(patched, journal))
        again = unet_render(explicit)
    assert torch.equal(out, again)
    assert not journal.decisions() and not journal.renders and not report_lines(caplog, "")
    attends = [e for e in journal.events if isinstance(e, Attend)]
    assert attends and not any(a.calibrated for a in attends)
    depth_1 = {a.kv for a in attends if a.q == 16 * 16 and a.kv != UNET_TEXT_TOKENS}
    assert depth_1 == {8 * 8}, "auto acted: factor 2 at depth 1"


@pytest.mark.parametrize(
    "inputs",
    [
        {"mode": "auto", "native_resolution": 64},
        {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 3.0, "depth_3_factor": 1.0},
    ],
    ids=["auto", "manual"],
)
def test_report_error_measures_the_configured_factors_and_reports_once(node, sd15, journal, caplog, inputs):
    plain = unet_render(apply_node(node, sd15, **inputs), steps=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        reported = unet_render(apply_node(node, probed(sd15, journal), **inputs, report_error=True), steps=2)
    lines = report_lines(caplog, inputs["mode"])
    assert len(lines) == 1 and "max_error" not in lines[0], lines
    calibration = journal.renders[0]
    pairs = check_render(journal, calibration, lines[0])
    # auto at a 64-pixel native size keeps 8 x 8, 4 x 4 and 2 x 2 keys at depths 1-3: factor 2 at each
    expected = {1: 2.0, 2: 2.0, 3: 2.0} if inputs["mode"] == "auto" else {1: 2.0, 2: 3.0, 3: 1.0}
    for key, decision in calibration.decisions.items():
        assert decision.factor == expected[key.group[1]], (key, decision)
        assert (decision.error > 0) == (decision.factor > 1)
    assert any(e.factor > 1 for e, _ in pairs)
    # The override path projects the whole sequence, then selects keys; the attn1 patch selects, then projects:
    # nearest selection commutes with the bias-free projection exactly.
    assert torch.equal(reported, plain)


LINEAR_METHOD_TOLERANCE = 5e-4
"""Largest difference the report may make with a linear downsampling method: measured 1.5e-4 on the tiny SD1.5
(pooling then projecting, or projecting then pooling, sums in another order), against 7e-4 to 4e-3 for ToDo's own
effect on the same render."""


@pytest.mark.parametrize("method", ["nearest-exact", "avg_pool", "area", "bilinear", "bicubic", "max_pool"])
def test_report_error_with_each_downsampling_method(node, sd15, method):
    """Linear methods commute with the key and value projections (up to rounding); max pooling does not.

    Known limitation: with ``max_pool`` the report (and fidelity mode) pools the projected keys and values, not
    the hidden states as the attn1 patch does, so asking for the report changes the render by more than the
    rounding of the other methods (measured 0.034 against ToDo's own 0.025 on this render).
    """
    inputs = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 3.0, "depth_3_factor": 1.0, "method": method}
    plain = unet_render(apply_node(node, sd15, **inputs), (24, 20), steps=2)
    reported = unet_render(apply_node(node, sd15, **inputs, report_error=True), (24, 20), steps=2)
    difference = float((reported - plain).abs().max())
    if method == "nearest-exact":
        assert difference == 0.0
    elif method == "max_pool":
        assert difference > 10 * LINEAR_METHOD_TOLERANCE
    else:
        assert difference <= LINEAR_METHOD_TOLERANCE


# --- 7. never crash ------------------------------------------------------------------------------------------------


def test_hypertile_before_fidelity_falls_back_to_auto_with_one_warning(node, sd15, journal, caplog):
    from comfy_extras.nodes_hypertile import HyperTile

    tiled = apply_node(HyperTile, probed(sd15, journal), tile_size=64, swap_size=2, max_depth=0, scale_depth=False)
    inputs = {"native_resolution": 128}  # a 16 x 16 latent is native: auto's factor 1, 2 at 32 x 32
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = unet_render(apply_node(node, tiled, mode="fidelity", max_error=0.3, **inputs), (32, 32), steps=2)
    assert torch.isfinite(out).all()
    warnings = todo_warnings(caplog)
    assert len(warnings) == 1 and "tiled queries" in warnings[0], warnings
    calibration = journal.renders[0]
    lines = report_lines(caplog)
    assert len(lines) == 1 and "not measurable, auto factor used" in lines[0]
    check_render(journal, calibration, lines[0])
    fallen = {k: d for k, d in calibration.decisions.items() if not d.measured}
    assert fallen and {k.group for k in fallen} == {("depth", 1)}, "HyperTile tiles depth 1 only (max_depth 0)"
    assert {d.factor for d in fallen.values()} == {2.0}, "auto's factor at 32 x 32"
    assert calibration.failures == len(fallen)
    assert any(d.measured and d.factor > 1 for d in calibration.decisions.values()), "the other depths measured"


def test_direct_model_calls_without_a_render_warn_once(node, sd15, caplog):
    """A model called outside a sampler has no render: each call measures afresh, and what cannot be measured
    (HyperTile's tiled queries) is told once, not once per model call."""
    from comfy_extras.nodes_hypertile import HyperTile
    from comfy_support import forward

    tiled = apply_node(HyperTile, sd15, tile_size=64, swap_size=2, max_depth=0, scale_depth=False)
    patched = apply_node(node, tiled, mode="fidelity", max_error=0.3, native_resolution=128)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        outputs = [forward(patched, (32, 32), batch=1, seed=seed) for seed in range(3)]
    assert all(torch.isfinite(out).all() for out in outputs)
    warnings = [w for w in todo_warnings(caplog) if "could not measure" in w]
    assert len(warnings) == 1, todo_warnings(caplog)
    assert not report_lines(caplog), "no render, no report"


def test_a_layout_it_cannot_place_passes_through(node, sd15, journal, caplog):
    """An attn1 patch before ToDo that drops one key: K/V no longer fill the grid (see the compat matrix)."""
    off_grid = probed(sd15, journal).clone()
    off_grid.set_model_attn1_patch(lambda q, k, v, extra: (q, k[:, :-1], v[:, :-1]))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = unet_render(apply_node(node, off_grid, mode="fidelity", max_error=LOOSE))
    assert torch.isfinite(out).all()
    assert len(todo_warnings(caplog)) == 1 and "grid" in todo_warnings(caplog)[0]
    assert not journal.decisions() and not report_lines(caplog), "nothing placed, nothing measured or reported"
    self_attention = [e for e in journal.events if isinstance(e, Attend) and e.kv != UNET_TEXT_TOKENS]
    assert self_attention and all(e.kv == e.q - 1 for e in self_attention), "passed through, unreduced"


def test_the_window_is_respected(node, sd15, journal):
    import comfy.samplers

    patched = apply_node(node, probed(sd15, journal), mode="fidelity", max_error=LOOSE, start_percent=0.5)
    unet_render(patched, steps=4)
    calibration = journal.renders[0]
    check_render(journal, calibration)
    attends = [e for e in journal.events if isinstance(e, Attend) and e.kv != UNET_TEXT_TOKENS]
    outside = [e for e in attends if not e.calibrated]
    assert outside and all(e.kv == e.q for e in outside), "calls before the window: unmeasured, unreduced"
    bands = {k.band for k in calibration.decisions}
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "normal", 4)
    edge = sd15.get_model_object("model_sampling").percent_to_sigma(0.5)
    assert sum(1 for s in sigmas[:-1] if s <= edge) == 2, "two of four steps in the window"
    assert bands and 0 not in bands, "the early band lies before the window"


def test_odd_latent_sides(node, sd15, journal, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = unet_render(apply_node(node, probed(sd15, journal), mode="fidelity", max_error=LOOSE), (35, 47))
    assert torch.isfinite(out).all() and out.shape[-2:] == (35, 47)
    assert not todo_warnings(caplog)
    pairs = check_render(journal, journal.renders[0], report_lines(caplog)[0])
    assert {e.key.grid for e, _ in pairs} == {(35, 47), (18, 24), (9, 12)}
    assert any(e.factor > 1 for e, _ in pairs)


def test_meta_device_uses_the_configured_factor(node):
    """Full-width SD1.5 on ``meta`` (shapes only), called as the compat matrix's size sweep calls it: the model-call
    wrapper never runs, nothing is measured, auto's counts are what the backend gets."""
    import comfy.model_base
    import comfy.supported_models

    from benchmarks.comfyui_level import FULL_UNETS

    meta = torch.device("meta")
    unet = random_patcher(
        comfy.supported_models.SD15, comfy.model_base.BaseModel, FULL_UNETS["sd15"], torch.float16, meta
    )
    counts = {}
    for mode in ("auto", "fidelity"):
        journal = Journal()
        patched = apply_node(node, probed(unet, journal, compute=False), mode=mode)
        options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers}
        with torch.no_grad():
            out = unet.model.diffusion_model(
                torch.zeros(1, 4, 135, 97, device=meta, dtype=torch.float16),
                torch.zeros(1, device=meta),
                torch.zeros(1, 7, 768, device=meta, dtype=torch.float16),
                transformer_options=options,
            )
        assert out.shape == (1, 4, 135, 97)
        counts[mode] = [(e.q, e.kv) for e in journal.events]
    assert counts["fidelity"] == counts["auto"]
    assert any(kv < q for q, kv in counts["auto"]), "auto reduces at 1080 x 776"


# --- torch.compile ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # dynamo traces the tiny UNet twice: 40 to 70 s on a loaded 2-core machine
def test_torch_compile_measures_nothing_and_uses_the_configured_factor(node, journal, caplog):
    """Dynamo's ``eager`` backend with TorchCompileModel's guard filter (see test_torch_compile.py).

    Measuring reads the host, so a compiled model measures nothing (no decision, no report line, one note) and
    runs auto mode's factors through the attn1 patch alone: ToDo's UNet override is left out of a compiled model's
    calls. Fidelity mode and auto mode with its report then give the eager auto render, bit for bit; and since no
    graph is traced with ToDo's override, a later compiled render of the model without ToDo reuses nothing it
    cannot run (TorchCompileModel's guard filter drops every guard on transformer_options: a UNet graph traced
    with an override, reused without one, fails with KeyError 'optimized_attention_override').
    """
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_torch_compile import skip_torch_compile_dict

    base = tiny_model(
        "sd15", channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1]
    )
    auto = {"native_resolution": 64}

    def compiled(model):
        model = model.clone()
        set_torch_compile_wrapper(model, backend="eager", options={"guard_filter_fn": skip_torch_compile_dict})
        return model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager_auto = unet_render(apply_node(node, base, mode="auto", **auto))
        eager_plain = unet_render(base)
        journal.clear()
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            fidelity = unet_render(compiled(apply_node(node, base, mode="fidelity", max_error=LOOSE, **auto)))
            reported = unet_render(compiled(apply_node(node, base, mode="auto", report_error=True, **auto)))
            plain = unet_render(compiled(base))  # no dynamo reset: whatever was traced above must still run
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)
    assert torch.isfinite(fidelity).all()
    assert torch.equal(fidelity, eager_auto) and torch.equal(reported, eager_auto)
    assert torch.isfinite(plain).all() and not torch.equal(plain, eager_auto)
    torch.testing.assert_close(plain, eager_plain, rtol=1e-5, atol=1e-5)
    assert len(journal.renders) == 2 and not any(c.decisions for c in journal.renders), "nothing measured"
    assert not report_lines(caplog) and not report_lines(caplog, "auto") and not todo_warnings(caplog)
    notes = [r.getMessage() for r in caplog.records if r.name == LOGGER and "is compiled" in r.getMessage()]
    assert len(notes) == 2, notes  # one per render


# --- 8. the node as ComfyUI runs it -------------------------------------------------------------------------------


def test_comfyui_validates_and_executes_the_new_inputs_and_prompts_without_them(node, sd15, journal, tmp_path):
    """ComfyUI's own validation of a prompt (the model from a checkpoint loader: validation checks its file name
    only), then the node's execute as ComfyUI calls it; a prompt saved before the two inputs existed still works."""
    import asyncio

    import execution
    import folder_paths

    (tmp_path / "stand_in.safetensors").touch()
    folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    saved = {"mode": "auto", "depth_1_factor": 2.0, "depth_2_factor": 1.0, "depth_3_factor": 1.0, "method": "nearest",
             "start_percent": 0.0, "end_percent": 1.0, "native_resolution": 0, "dit_blocks": "all",
             "temporal_factor": 1.0}  # fmt: skip

    def validate(inputs: dict):
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "stand_in.safetensors"}},
            "2": {"class_type": "ToDoModelPatch", "inputs": {"model": ["1", 0], **inputs}},
        }
        return asyncio.run(execution.validate_inputs("test", prompt, "2", {}))

    fidelity = {**saved, "mode": "fidelity"}
    assert validate(saved)[0] is True
    assert validate(fidelity)[0] is True
    assert validate({**fidelity, "max_error": 0.2, "report_error": True})[0] is True
    refused = validate({**fidelity, "max_error": 0.9})
    assert refused[0] is False and "max_error must be between" in str(refused[1])
    for inputs in (saved, fidelity, {**fidelity, "max_error": 0.3}):
        (patched,) = node.EXECUTE_NORMALIZED(model=probed(sd15, journal), **inputs).result
        assert torch.isfinite(unet_render(patched)).all()
    assert len(journal.renders) == 2, "the fidelity renders calibrated; the saved auto prompt did not"
    defaults, loose = journal.renders
    assert defaults.max_error == 0.03 and loose.max_error == 0.3
    assert all(d.error <= 0.03 for d in defaults.decisions.values())
    assert sum(d.kept for d in defaults.decisions.values()) > sum(d.kept for d in loose.decisions.values())
