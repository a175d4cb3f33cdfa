"""The DiT attention benchmark measures what it claims: the correction helps and the LSE merge is the same math."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from todo_core.bench.comfyui_path import PACK_ROOT
from todo_core.bench.dit_attention import (
    TEXT_TOKENS,
    joint_inputs,
    lse_merge_attention,
    markdown,
    relative_error,
    summarise_fidelity,
)
from todo_core.dit import reduce_keys


@pytest.fixture(scope="module")
def inputs():
    pytest.importorskip("skimage", reason="the benchmark's tokens come from scikit-image's photos")
    return joint_inputs("astronaut", 24, 24)


def test_mass_correction_lowers_the_error_of_joint_attention(inputs):
    q, k, v, layout = inputs
    assert layout.prefix == TEXT_TOKENS and q.shape[2] == TEXT_TOKENS + 24 * 24
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = {}
    for corrected in (False, True):
        k_small, v_small, mask = reduce_keys(k, v, None, layout, 2, 2, mass_correction=corrected)
        errors[corrected] = relative_error(F.scaled_dot_product_attention(q, k_small, v_small, attn_mask=mask), exact)
    assert errors[True] < errors[False] / 2


@pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"), reason="needs torch's CPU flash op"
)
def test_lse_merge_equals_the_masked_kernel(inputs):
    q, k, v, layout = inputs
    k_small, v_small, mask = reduce_keys(k, v, None, layout, 2, 2)
    masked = F.scaled_dot_product_attention(q, k_small, v_small, attn_mask=mask)
    torch.testing.assert_close(lse_merge_attention(q, k, v, layout, 2), masked, rtol=1e-5, atol=1e-5)


def test_summary_and_table():
    rows = [
        {"grid": "8x8", "photo": p, "factor": 2, "mass_correction": c, "kv_tokens": 93, "error_all": e,
         "error_text_queries": e / 2}
        for p, c, e in (("a", False, 0.2), ("b", False, 0.4), ("a", True, 0.01), ("b", True, 0.03))
    ]  # fmt: skip
    summary = summarise_fidelity(rows)
    plain = next(r for r in summary if not r["mass_correction"])
    assert plain["error_mean"] == pytest.approx(0.3) and plain["error_max"] == 0.4
    table = markdown({"device": "CPU", "torch": "x"}, summary, [])
    assert "| 8x8 | 2 | 93 | 30.0% (20.0%–40.0%) | 2.0% (1.0%–3.0%) | 15.0% \u2192 1.0% |" in table


# The README's DiT paragraphs quote the committed results; these tests keep the quotes and the results in step.

COMMITTED = PACK_ROOT / "bench-results"


def _readme() -> str:
    return " ".join((PACK_ROOT / "README.md").read_text(encoding="utf-8").split())


def _percent(value: float) -> str:
    """As the README writes a percentage: one decimal below 1 %, whole numbers above."""
    return f"{100 * value:.1f}" if value < 0.01 else f"{round(100 * value)}"


def test_readme_quotes_the_committed_dit_attention_errors_and_costs():
    """The README's sentences on the correction and its cost speak of the text-first layout (Flux's)."""
    data = json.loads((COMMITTED / "dit-attention" / "results.json").read_text())

    fidelity, timing = ([r for r in data[part] if r.get("layout", "text-first") == "text-first"]
                        for part in ("fidelity", "timing"))  # fmt: skip

    def errors(factor: int, corrected: bool) -> str:
        rows = [r for r in fidelity if r["factor"] == factor and r["mass_correction"] == corrected]
        return f"{_percent(min(r['error_min'] for r in rows))}–{_percent(max(r['error_max'] for r in rows))} %"

    def costs(variant: str) -> str:
        seconds = {(r["grid"], r["factor"], r["variant"]): r["seconds"] for r in timing}
        ratios = [seconds[(g, f, variant)] / seconds[(g, f, "todo_uncorrected")] - 1
                  for g, f, v in seconds if v == variant]  # fmt: skip
        return f"{_percent(min(ratios))}–{_percent(max(ratios))} %"

    text = _readme()
    assert (f"The correction takes the error of plain subsampling from {errors(2, False)} to {errors(2, True)} at "
            f"factor 2 and from {errors(4, False)} to {errors(4, True)} at factor 4.") in text  # fmt: skip
    assert f"the mask costs {costs('todo_mask')} against no correction" in text
    assert f"log-sum-exp costs {costs('todo_lse_merge')}" in text


def test_readme_quotes_the_committed_dit_model_latent_changes():
    checks = json.loads((COMMITTED / "dit-model" / "results.json").read_text())["checks"]

    def change(model: str, setting: str) -> str:
        return f"{100 * checks[f'{model} 1024² {setting}: relative difference of the stepped latent']:.1f} %"

    assert (f"Flux 1024² factor 2 moves it by {change('flux', 'todo-2')} with the correction and "
            f"{change('flux', 'todo-2-no-mass-correction')} without, SD3 by {change('sd3', 'todo-2')} and "
            f"{change('sd3', 'todo-2-no-mass-correction')}") in _readme()  # fmt: skip


def test_dit_model_results_state_the_full_stack_assumption():
    notes = json.loads((COMMITTED / "dit-model" / "results.json").read_text())["meta"]["notes"]
    assert any(note.startswith("Few-block models") and "assumes" in note for note in notes)
    assert "assumes" in (COMMITTED / "dit-model" / "results.md").read_text(encoding="utf-8")


def test_readme_quotes_the_committed_errors_of_the_other_layouts():
    data = json.loads((COMMITTED / "dit-attention-layouts" / "results.json").read_text())

    def error(layout: str, grid: str, factor: int, corrected: bool) -> str:
        rows = [r for r in data["fidelity"] if (r["layout"], r["grid"], r["factor"], r["mass_correction"],
                r["temporal_factor"]) == (layout, grid, factor, corrected, 1)]  # fmt: skip
        assert len(rows) == 1
        return f"{100 * rows[0]['error_mean']:.1f} %"

    plain = [error(layout, "95x97", 2, False) for layout in ("image-first", "padded-32", "registers")]
    corrected = [error(layout, "95x97", 2, True) for layout in ("image-first", "padded-32", "registers")]
    text = _readme()
    assert f"from {plain[0]}, {plain[1]} and {plain[2]} to {corrected[0]}, {corrected[1]} and {corrected[2]}" in text
    assert error("video", "30x52", 2, False) == error("video", "30x52", 2, True)
    assert f"{error('video', '30x52', 2, True)} either way at factor 2" in text
    assert f"{error('video', '30x52', 4, True)} against {error('video', '30x52', 4, False)} without it" in text
