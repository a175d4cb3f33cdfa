"""The benchmark's building blocks: exact where they must be, and the CLI end to end at tiny sizes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage", reason="the attention benchmark needs scikit-image: pip install scikit-image")

from todo_core import DownsampleMethod
from todo_core.bench import report
from todo_core.bench.__main__ import main
from todo_core.bench.attention_level import (
    hypertile_outputs,
    relative_error,
    todo_outputs,
    tome_merge,
    tome_outputs,
)
from todo_core.bench.memory import measure_peak
from todo_core.bench.tokens import attention_layer, photo_tokens

GRID = (24, 20)


@pytest.fixture(scope="module")
def layer_and_tokens():
    hidden = photo_tokens("astronaut", *GRID, channels=32)
    return attention_layer(hidden, heads=4, head_dim=8), hidden


def exact(layer, hidden):
    return F.scaled_dot_product_attention(layer.queries(hidden), *layer.keys_values(hidden))


def test_photo_tokens_have_spatial_structure():
    tokens = photo_tokens("coffee", 48, 64, channels=64)[0].view(48, 64, 64)
    assert torch.allclose(tokens.mean(-1), torch.zeros(48, 64), atol=1e-4)
    neighbours = (tokens[:, :-1] - tokens[:, 1:]).square().sum(-1).mean()
    shuffled = tokens.reshape(-1, 64)[torch.randperm(48 * 64, generator=torch.Generator().manual_seed(0))]
    random_pairs = (tokens.reshape(-1, 64) - shuffled).square().sum(-1).mean()
    assert neighbours < 0.5 * random_pairs, "neighbouring tokens must be alike, as in a real latent"


def test_variants_are_exact_when_they_reduce_nothing(layer_and_tokens):
    layer, hidden = layer_and_tokens
    reference = exact(layer, hidden)
    all_queries = torch.arange(GRID[0] * GRID[1])
    q = layer.queries(hidden)
    assert relative_error(todo_outputs(layer, hidden, GRID, q, DownsampleMethod.NEAREST, 1.0), reference) == 0.0
    assert relative_error(hypertile_outputs(layer, hidden, GRID, all_queries, 1), reference) < 1e-6
    assert relative_error(tome_outputs(layer, hidden, GRID, all_queries, 0.0), reference) < 1e-6


def test_errors_grow_with_the_factor_and_nearest_beats_max_pool():
    hidden = photo_tokens("astronaut", 64, 64, channels=64)
    layer = attention_layer(hidden, heads=4, head_dim=16)
    reference = exact(layer, hidden)
    q = layer.queries(hidden)

    def error(method, factor):
        return relative_error(todo_outputs(layer, hidden, (64, 64), q, method, factor), reference)

    assert 0 < error(DownsampleMethod.NEAREST, 2) < error(DownsampleMethod.NEAREST, 4)
    assert error(DownsampleMethod.NEAREST, 2) < error(DownsampleMethod.MAX_POOL, 2)


def test_tome_merge_keeps_every_token_represented():
    hidden = photo_tokens("chelsea", 9, 11, channels=16)
    merged, representative = tome_merge(hidden, (9, 11), 0.5, torch.Generator().manual_seed(0))
    assert merged.shape[1] == 9 * 11 - int(0.5 * 9 * 11)
    assert representative.shape == (99,) and int(representative.max()) == merged.shape[1] - 1


def test_measure_peak_reports_memory_or_none():
    result, peak = measure_peak(lambda: torch.ones(1 << 20).sum(), torch.device("cpu"))
    assert float(result) == float(1 << 20)
    assert peak is None or peak >= 0


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    start, end = report.readme_markers()
    readme.write_text(f"intro\n{start}\nold\n{end}\noutro\n")
    assert report.update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{start}\nnew table\n{end}\noutro\n"
    assert not report.update_readme(readme, "x", name="other")
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers\n")
    assert not report.update_readme(unmarked, "x")
    assert unmarked.read_text() == "no markers\n"


def test_cli_attention_level_writes_results(tmp_path, capsys):
    assert main(["--preset", "tiny", "--levels", "attention", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["device"] in ("cpu", "cuda") and data["meta"]["date"]
    kinds = {row["kind"] for row in data["rows"]}
    assert kinds == {"fidelity", "timing"}
    families = {row["family"] for row in data["rows"]}
    assert {"todo", "hypertile", "tome", "exact"} <= families
    assert all(0.0 <= row["rel_error"] < 1.5 for row in data["rows"] if row["kind"] == "fidelity")
    todo_timing = [row for row in data["rows"] if row["kind"] == "timing" and row["family"] == "todo"]
    assert todo_timing and all(row["seconds"] > 0 and "overhead" in row for row in todo_timing)
    markdown = (tmp_path / "results.md").read_text()
    assert "Attention-level fidelity" in markdown and "nearest x2" in markdown
    assert "Attention-level fidelity" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.comfyui
def test_cli_model_level_through_comfyui(node, tmp_path):
    assert main(["--preset", "tiny", "--levels", "model", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["setting"] for row in rows] == ["unpatched", "todo-2"]
    assert all(row["seconds"] > 0 and row["backend"] == "attention_pytorch" for row in rows)
    assert "Model level" in (tmp_path / "results.md").read_text()


def test_cli_regenerates_reports_from_a_results_file(tmp_path):
    results = tmp_path / "run"
    assert main(["--preset", "tiny", "--levels", "attention", "--out-dir", str(results)]) == 0
    again = tmp_path / "again"
    assert main(["--from-results", str(results / "results.json"), "--out-dir", str(again)]) == 0
    assert (again / "results.md").read_text() == (results / "results.md").read_text()
