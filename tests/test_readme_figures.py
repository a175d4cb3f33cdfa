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


@pytest.mark.parametrize(("row", "mode"), [("Flux or SD3 at 2048²", "auto"), ("Flux or SD3 at 1024²", "manual")])
def test_dit_rows(row, mode):
    from todo_core.dit import DIT_FAMILIES
    from todo_core.downsample import output_tokens

    side = 2048 if "2048" in row else 1024
    for name in ("flux", "sd3"):
        family = DIT_FAMILIES[name]
        grid = side // family.pixels_per_token[0]
        factor = ToDoConfig.create(mode, 2.0).image_token_factor(grid, grid, family.native_tokens)
        kept = output_tokens(grid, grid, factor, factor) / grid**2
        assert f"image keys {100 * kept:.0f} %" in table_row(row)
