"""The benchmark's building blocks: exact where they must be, and the CLI end to end at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage", reason="the attention benchmark needs scikit-image: pip install scikit-image")

from todo_core import DownsampleMethod
from todo_core.bench import __main__ as cli
from todo_core.bench import peers as peer_module
from todo_core.bench import report
from todo_core.bench.__main__ import MMAP_ENV, main
from todo_core.bench.attention_level import (
    AttentionConfig,
    extra_options,
    peer_variants,
    relative_error,
    run_attn1,
    sampled_rows,
    todo_patch,
)
from todo_core.bench.peers import IDENTITY, TorchPeers, tome_qkv
from todo_core.bench.tokens import attention_layer, photo_tokens

GRID = (24, 20)
SQUARE = (24, 24)
PEERS = TorchPeers()


@pytest.fixture(scope="module")
def layer_and_tokens():
    hidden = photo_tokens("astronaut", *GRID, channels=32)
    return attention_layer(hidden, heads=4, head_dim=8), hidden


def exact(layer, hidden):
    return run_attn1(layer, hidden, IDENTITY, extra_options(GRID, layer.heads))[0]


def test_photo_tokens_have_spatial_structure():
    tokens = photo_tokens("coffee", 48, 64, channels=64)[0].view(48, 64, 64)
    assert torch.allclose(tokens.mean(-1), torch.zeros(48, 64), atol=1e-4)
    neighbours = (tokens[:, :-1] - tokens[:, 1:]).square().sum(-1).mean()
    shuffled = tokens.reshape(-1, 64)[torch.randperm(48 * 64, generator=torch.Generator().manual_seed(0))]
    random_pairs = (tokens.reshape(-1, 64) - shuffled).square().sum(-1).mean()
    assert neighbours < 0.5 * random_pairs, "neighbouring tokens must be alike, as in a real latent"


def test_exact_path_is_plain_attention(layer_and_tokens):
    layer, hidden = layer_and_tokens
    q, k, v = (layer.queries(hidden), *layer.keys_values(hidden))
    reference = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, hidden.shape[-1])
    out, work = run_attn1(layer, hidden, IDENTITY, extra_options(GRID, layer.heads))
    torch.testing.assert_close(out, reference)
    assert work == 1.0


def test_variants_are_exact_when_they_reduce_nothing(layer_and_tokens):
    layer, hidden = layer_and_tokens
    reference = exact(layer, hidden)
    options = extra_options(GRID, layer.heads)
    untouched = [todo_patch(GRID, DownsampleMethod.NEAREST, 1.0), PEERS.tome_node(0.0), tome_qkv(PEERS, 0.0),
                 PEERS.hypertile_node(8 * max(GRID))]  # fmt: skip
    for patch in untouched:
        out, work = run_attn1(layer, hidden, patch, options)
        assert work == 1.0 and relative_error(out, reference) < 1e-6


def test_sampled_rows_are_the_full_runs_rows():
    hidden = photo_tokens("chelsea", *SQUARE, channels=32)
    layer = attention_layer(hidden, heads=4, head_dim=8)
    options = extra_options(SQUARE, layer.heads)
    index = torch.randperm(SQUARE[0] * SQUARE[1], generator=torch.Generator().manual_seed(3))[:70].sort().values
    config = AttentionConfig(hypertile_tiles=(2, 3, 4), tome_ratios=(0.5, 0.75))
    variants = [(None, lambda: IDENTITY), (None, lambda: todo_patch(SQUARE, DownsampleMethod.AVG_POOL, 2.5)),
                *peer_variants(config, SQUARE, PEERS)]  # fmt: skip
    assert len(variants) == 2 + 3 * 2 + 2 * 2
    for _, make in variants:
        full, work = run_attn1(layer, hidden, make(), options)
        rows, sampled_work = sampled_rows(layer, hidden, make(), options, index)
        torch.testing.assert_close(rows, full[:, index], rtol=1e-5, atol=1e-5)
        assert work == sampled_work


def test_work_kept_is_the_share_of_query_key_products():
    hidden = photo_tokens("rocket", 32, 32, channels=32)
    layer = attention_layer(hidden, heads=4, head_dim=8)
    options = extra_options((32, 32), layer.heads)
    merged = int(1024 * 0.5)
    works = {v.label: run_attn1(layer, hidden, make(), options)[1]
             for v, make in peer_variants(AttentionConfig(hypertile_tiles=(2, 4)), (32, 32), PEERS)}  # fmt: skip
    assert works["tome ratio 0.5"] == (1024 - merged) / 1024  # queries merged, every key kept
    assert works["tome-qkv ratio 0.5"] == ((1024 - merged) / 1024) ** 2  # queries and keys merged
    assert works["hypertile 2x2 tiles"] == works["hypertile-qkv 2x2 tiles"] == 1 / 4
    assert works["hypertile 4x4 tiles"] == 1 / 16
    assert run_attn1(layer, hidden, todo_patch((32, 32), DownsampleMethod.NEAREST, 3.0), options)[1] == (11 / 32) ** 2


def test_comfyui_hypertile_tiles_queries_against_consecutive_keys():
    """ComfyUI's HyperTile leaves keys and values whole; attention views them with the query tiles' batch."""
    hidden = photo_tokens("astronaut", 16, 16, channels=32)
    layer = attention_layer(hidden, heads=4, head_dim=8)
    out, _ = run_attn1(layer, hidden, PEERS.hypertile_node(8 * 8), extra_options((16, 16), layer.heads))
    top_left = hidden.view(1, 16, 16, 32)[:, :8, :8].reshape(1, 64, 32)
    first_run = hidden[:, :64]  # the first quarter of the tokens: the top four rows
    expected = F.scaled_dot_product_attention(layer.queries(top_left), *layer.keys_values(first_run))
    torch.testing.assert_close(out.view(1, 16, 16, 32)[:, :8, :8].reshape(1, 64, 32),
                               expected.transpose(1, 2).reshape(1, 64, 32))  # fmt: skip


def test_errors_grow_with_the_factor_and_nearest_beats_max_pool():
    hidden = photo_tokens("astronaut", 64, 64, channels=64)
    layer = attention_layer(hidden, heads=4, head_dim=16)
    options = extra_options((64, 64), layer.heads)
    reference = run_attn1(layer, hidden, IDENTITY, options)[0]

    def error(method, factor):
        return relative_error(run_attn1(layer, hidden, todo_patch((64, 64), method, factor), options)[0], reference)

    assert 0 < error(DownsampleMethod.NEAREST, 2) < error(DownsampleMethod.NEAREST, 4)
    assert error(DownsampleMethod.NEAREST, 2) < error(DownsampleMethod.MAX_POOL, 2)


@pytest.fixture(scope="module")
def comfyui_peers():
    from comfy_support import import_comfyui

    return peer_module.comfyui_peers_module().comfyui_peers(import_comfyui())


@pytest.mark.comfyui
@pytest.mark.parametrize("shape", [(2, 9, 11), (1, 16, 16), (1, 12, 20)])
def test_torch_merge_is_comfyuis_bit_for_bit(comfyui_peers, shape):
    batch, h, w = shape
    metric = torch.randn(batch, h * w, 24, generator=torch.Generator().manual_seed(h * w))
    x = torch.randn(batch, h * w, 40, generator=torch.Generator().manual_seed(1))
    for r, no_rand in ((h * w // 2, False), (h * w // 3, True), (10_000, False)):
        results = []
        for match in (comfyui_peers.tomesd.bipartite_soft_matching_random2d, peer_module.soft_matching_2d):
            torch.manual_seed(7)
            merge, unmerge = match(metric, w, h, 2, 2, r, no_rand)
            merged = merge(x)
            results.append((merged, unmerge(merged), torch.rand(1)))  # the last: the generator left the same
        for ours, theirs in zip(results[1], results[0], strict=True):
            assert torch.equal(ours, theirs)
    for ratio in (0.3, 0.5):
        for original in ([1, 4, h, w], [1, 4, 2 * h, 2 * w]):  # acting at full resolution only
            torch.manual_seed(3)
            theirs = comfyui_peers.merge_functions(x, ratio, original)[0](x)
            torch.manual_seed(3)
            assert torch.equal(PEERS.merge_functions(x, ratio, original)[0](x), theirs)


@pytest.mark.comfyui
def test_torch_divisor_is_comfyuis(comfyui_peers):
    for value, low, options in ((128, 32, 2), (192, 32, 3), (96, 40, 1), (20, 64, 2), (210, 7, 4)):
        torch.manual_seed(value)
        theirs = (comfyui_peers.random_divisor(value, low, options), torch.rand(1))
        torch.manual_seed(value)
        assert (PEERS.random_divisor(value, low, options), torch.rand(1)) == theirs


@pytest.mark.comfyui
@pytest.mark.parametrize("grid", [(24, 24), (24, 20), (16, 32)])
def test_torch_peer_nodes_run_as_comfyuis(comfyui_peers, grid):
    """Every peer variant, run through the layer, gives the same output on either implementation."""
    hidden = photo_tokens("coffee", *grid, channels=32)
    layer = attention_layer(hidden, heads=4, head_dim=8)
    options = extra_options(grid, layer.heads)
    ours = [PEERS.tome_node(0.5), tome_qkv(PEERS, 0.75), PEERS.hypertile_node(64), PEERS.hypertile_node(96, 3)]
    theirs = [comfyui_peers.tome_node(0.5), tome_qkv(comfyui_peers, 0.75), comfyui_peers.hypertile_node(64),
              comfyui_peers.hypertile_node(96, 3)]  # fmt: skip
    config = AttentionConfig(hypertile_tiles=(2, 4), tome_ratios=(0.5,))
    ours += [make() for _, make in peer_variants(config, grid, PEERS)]
    theirs += [make() for _, make in peer_variants(config, grid, comfyui_peers)]
    for mine, comfy in zip(ours, theirs, strict=True):
        a, work_a = run_attn1(layer, hidden, mine, options)
        b, work_b = run_attn1(layer, hidden, comfy, options)
        assert torch.equal(a, b) and work_a == work_b


def test_benchmark_uses_comfyuis_peers_when_present(monkeypatch):
    from todo_core.bench.comfyui_path import find_comfyui

    if find_comfyui() is None:
        pytest.skip("ComfyUI not found: the benchmark falls back to the torch-only peers")
    assert type(peer_module.load_peers()).__name__ == "ComfyUIPeers"
    assert type(peer_module.load_peers(use_comfyui=False)) is TorchPeers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident memory is read from Linux /proc")
def test_measure_peak_sees_a_64_mib_buffer():
    """In a process set up as the benchmark runs (large buffers mmapped), a touched 64 MiB buffer shows in the
    peak, and a 1 MiB one does not look like it."""
    code = (
        "import torch\n"
        "from todo_core.bench.memory import measure_peak\n"
        "cpu = torch.device('cpu')\n"
        "result, big = measure_peak(lambda: torch.ones(16 << 20).sum(), cpu)\n"
        "assert float(result) == float(16 << 20)\n"
        "_, small = measure_peak(lambda: torch.ones(1 << 18).sum(), cpu)\n"
        "print(big, small)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **MMAP_ENV, "PYTHONPATH": str(cli.PACK_ROOT)})  # fmt: skip
    big, small = (None if word == "None" else int(word) for word in done.stdout.split())
    if big is None:
        pytest.skip("this kernel does not let a process reset its peak resident memory (/proc/self/clear_refs)")
    assert big >= 0.9 * (64 << 20), f"a 64 MiB buffer measured as {big / 2**20:.1f} MiB"
    assert small < 16 << 20, f"a 1 MiB buffer measured as {small / 2**20:.1f} MiB"


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
    assert {"todo", "hypertile", "hypertile-qkv", "tome", "tome-qkv", "exact"} <= families
    assert all(row["projections"] == "q, k, v" for row in data["rows"] if row["kind"] == "timing")
    assert {row["setting"] for row in data["rows"] if row["kind"] == "timing"} >= {"nearest x1.5", "nearest x2"}
    assert all(0.0 <= row["rel_error"] < 1.5 for row in data["rows"] if row["kind"] == "fidelity")
    todo_timing = [row for row in data["rows"] if row["kind"] == "timing" and row["family"] == "todo"]
    assert todo_timing and all(row["seconds"] > 0 and "overhead" in row for row in todo_timing)
    markdown = (tmp_path / "results.md").read_text()
    assert "Attention-level fidelity" in markdown and "nearest x2" in markdown and "At equal attention work" in markdown
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


def test_default_run_leaves_the_committed_results_alone(tmp_path, monkeypatch):
    committed = tmp_path / "bench-results"
    committed.mkdir()
    (committed / "results.json").write_text("committed")
    readme = tmp_path / "README.md"
    start, end = report.readme_markers()
    readme.write_text(f"{start}\ncommitted\n{end}\n")
    monkeypatch.setattr(cli, "RESULTS_DIR", committed)
    monkeypatch.setattr(cli, "RUNS_DIR", committed / "runs")
    monkeypatch.setattr(cli, "README", readme)
    monkeypatch.setattr(cli, "run_attention_level", lambda *args: [])
    for _ in range(2):
        assert main(["--levels", "attention"]) == 0
    runs = sorted((committed / "runs").iterdir())
    assert len(runs) == 2 and all((run / "results.json").is_file() for run in runs), "a new folder per run"
    assert sorted(p.name for p in committed.iterdir()) == ["results.json", "runs"]
    assert (committed / "results.json").read_text() == "committed"
    assert "committed" in readme.read_text()
    assert main(["--levels", "attention", "--update-readme"]) == 0  # asked: the committed results and README
    assert (committed / "results.json").read_text() != "committed" and "committed" not in readme.read_text()
    help_text = cli_help()
    assert "bench-results/runs/<date-time>/" in help_text and "git-ignored" in help_text


def cli_help() -> str:
    done = subprocess.run([sys.executable, "-m", "todo_core.bench", "--help"], capture_output=True, text=True,
                          check=True, cwd=cli.PACK_ROOT, env={**os.environ, **MMAP_ENV})  # fmt: skip
    return "".join(done.stdout.split())


# The README's "What the tables below show" statements, checked against the committed results.


@pytest.fixture(scope="module")
def committed_rows():
    return json.loads((cli.RESULTS_DIR / "results.json").read_text())["rows"]


def _mean_errors(rows, factor):
    errors = {}
    for row in rows:
        if row.get("kind") == "fidelity" and row["family"] == "todo" and row["setting"].endswith(f" x{factor}"):
            errors.setdefault(row["setting"].split(" ")[0], []).append(row["rel_error"])
    return {method: sum(values) / len(values) for method, values in errors.items()}


def test_readme_method_statements_hold(committed_rows):
    for factor in (2, 3, 4):
        means = _mean_errors(committed_rows, factor)
        assert min(means, key=means.get) == "nearest-exact"
        assert means["nearest"] - means["nearest-exact"] < 0.01, "nearest less than a point behind"
        assert min(means["avg_pool"], means["area"]) > means["nearest"]
        assert max(means, key=means.get) == "max_pool"
    at_2 = _mean_errors(committed_rows, 2)
    assert 1.8 < at_2["avg_pool"] / at_2["nearest"] < 2.2, "about twice nearest's at factor 2"


def test_readme_peer_statements_hold(committed_rows):
    groups = {}
    for row in report.equal_work_rows(committed_rows):
        groups.setdefault((row["model"], row["depth"], row["work"]), []).append(row)
    assert groups
    for (model, _, work), members in groups.items():
        todo = next(r for r in members if r["family"] == "todo")
        assert todo["speedup"] == max(r["speedup"] for r in members), "ToDo has the highest speed-up"
        best = min(members, key=lambda r: r["rel_error"])
        if model == "sd15":
            assert best is todo
        else:
            expected = "tome ratio 0.75" if work == 0.25 else "tome-qkv ratio 0.75"
            assert f"{best['family']} {best['setting']}" == expected and best["speedup"] < todo["speedup"]
            assert todo["rel_error"] - best["rel_error"] < 0.01, "slightly lower"
        for peer in members:
            if peer["family"].startswith("hypertile"):
                assert peer["rel_error"] >= 2 * todo["rel_error"]


def test_readme_overhead_and_model_statements_hold(committed_rows):
    overheads = {row["setting"]: [] for row in committed_rows if "overhead" in row}
    for row in committed_rows:
        if "overhead" in row:
            overheads[row["setting"]].append(row["overhead"])
    values = [value for settings in overheads.values() for value in settings]
    assert min(values) < 0 < max(values), "both signs"
    assert any(float(setting.split("x")[-1]) % 1 for setting in overheads), "fractional factors timed"
    model = {row["setting"]: row["seconds"] for row in committed_rows if row.get("level") == "model"}
    assert model["hypertile-256"] < model["todo-2"] < model["unpatched"] <= model["tome-0.5"] * 1.02
