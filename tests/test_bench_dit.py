"""The DiT attention benchmark measures what it claims: the correction helps and the LSE merge is the same math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
