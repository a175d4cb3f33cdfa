"""Figures typed into the README outside its generated sections are recomputed here from the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from todo_core import ToDoAttn1Patch, ToDoConfig
from todo_core.architectures import LAYOUTS
from todo_core.demo import measure

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def table_row(first_cell: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"README has {len(rows)} table rows starting with {first_cell!r}"
    return rows[0]


def kept_percents(model: str, side: int, mode: str = "auto", factors=(2.0, 1.0, 1.0)) -> str:
    """'25 / 25 / 25 %' as the README writes it, depths 1-3, '—' where the model has no attention."""
    layout = LAYOUTS[model]
    patch = ToDoAttn1Patch(ToDoConfig.create(mode, *factors, native_resolution=layout.native_resolution))
    by_depth = {row["depth"]: row for row in measure(layout, side, side, patch)}
    cells = [
        f"{100 * by_depth[d]['kv_tokens'] / by_depth[d]['q_tokens']:.0f}" if d in by_depth else "—" for d in (1, 2, 3)
    ]
    return " / ".join(cells) + " %"


@pytest.mark.parametrize(
    ("row", "model", "side", "settings"),
    [
        ("SD1.5 at 1024²", "sd15", 1024, [("auto", None), ("manual", (2, 1, 1))]),
        ("SD1.5 at 1536²", "sd15", 1536, [("auto", None), ("manual", (3, 1, 1))]),
        ("SD1.5 at 2048²", "sd15", 2048, [("auto", None), ("manual", (4, 2, 1))]),
        ("SDXL at 1536²", "sdxl", 1536, [("auto", None)]),
        ("SDXL at 2048²", "sdxl", 2048, [("auto", None)]),
    ],
)
def test_recommended_settings_rows(row, model, side, settings):
    text = table_row(row)
    for mode, factors in settings:
        expected = kept_percents(model, side, mode, factors or (2.0, 1.0, 1.0))
        assert expected in text, f"{row}: README says {text!r}; the code gives {expected}"


def test_the_1080p_sentence():
    layout = LAYOUTS["sd15"]
    patch = ToDoAttn1Patch(ToDoConfig.create(native_resolution=layout.native_resolution))
    depth_1 = measure(layout, 1920, 1080, patch)[0]
    kept, total = depth_1["kv_tokens"], depth_1["q_tokens"]
    sentence = f"auto keeps\n{kept} of {total} depth-1 keys ({100 * kept / total:.1f} %)"
    assert re.sub(r"\s+", " ", sentence) in re.sub(r"\s+", " ", README)


def dit_kept_percent(name: str, width: int, height: int, mode: str = "auto", factor: float = 2.0, **member) -> int:
    """Image keys kept per frame, in percent, for a DiT family as one of its models is built."""
    from todo_core.downsample import output_tokens
    from todo_core.families import DEFAULT_LATENT_SCALE, DIT_FAMILIES, LATENT_SCALES

    latent_format = member.pop("latent_format", "")
    patch = member.pop("patch", None)
    scale = LATENT_SCALES.get(latent_format, DEFAULT_LATENT_SCALE)
    family = DIT_FAMILIES[name].for_model(member, patch, scale, latent_format)
    rows, cols = -(-height // family.pixels_per_token[0]), -(-width // family.pixels_per_token[1])
    chosen = ToDoConfig.create(mode, factor).image_token_factor(rows, cols, family.native_tokens)
    return round(100 * output_tokens(rows, cols, chosen, chosen) / (rows * cols))


FLUX2 = {"latent_format": "Flux2", "patch": (1, 1, 1)}
HUNYUAN_IMAGE = {"latent_format": "HunyuanImage21", "patch": (1, 1, 1)}
WAN_14B = {"dim": 5120}


@pytest.mark.parametrize(
    ("row", "cases"),
    [
        (
            "Flux.1, Flux.2, Z-Image, Chroma, SD3 or HiDream at 2048²",
            [
                ("flux", {}),
                ("flux", FLUX2),
                ("lumina2", {"pad_tokens_multiple": 32}),
                ("chroma", {}),
                ("sd3", {}),
                ("hidream", {}),
            ],
        ),
        ("Qwen-Image at 2048²", [("qwen_image", {})]),
        ("HunyuanImage 2.1 at 2048²", [("hunyuan_video", HUNYUAN_IMAGE)]),
        ("Wan 2.1 1.3B at 1280×720", [("wan", {})]),
        ("Wan 2.2 A14B or HunyuanVideo at 1280×720", [("wan", WAN_14B), ("hunyuan_video", {})]),
    ],
)
def test_dit_rows_auto(row, cases):
    width, height = (1280, 720) if "1280" in row else (2048, 2048)
    text = table_row(row)
    for name, member in cases:
        assert f"{dit_kept_percent(name, width, height, **dict(member))} %" in text, (name, member, text)


@pytest.mark.parametrize(
    ("row", "factors", "cases"),
    [
        ("HunyuanImage 2.1 at 2048²", (1.5,), [("hunyuan_video", HUNYUAN_IMAGE)]),
        ("Wan 2.2 A14B or HunyuanVideo at 1280×720", (1.5, 2.0), [("wan", WAN_14B), ("hunyuan_video", {})]),
    ],
)
def test_dit_rows_manual(row, factors, cases):
    width, height = (1280, 720) if "1280" in row else (2048, 2048)
    text = table_row(row)
    for name, member in cases:
        kept = [dit_kept_percent(name, width, height, "manual", f, **dict(member)) for f in factors]
        written = f"{kept[0]} %" if len(kept) == 1 else f"{kept[0]}–{kept[1]} %"
        assert written in text, (name, member, written, text)


def test_any_dit_at_its_native_size_with_factor_two():
    text = table_row("any DiT at its native size, when speed matters more than fidelity")
    assert f"image keys {dit_kept_percent('flux', 1024, 1024, 'manual', 2.0)} %" in text
