"""The fidelity level of the benchmark: it runs end to end at tiny sizes and writes its files and README section,
fidelity's factors are the mode's own choices, and the comparisons give known answers on made-up rows.

Structure and arithmetic only: no test here asserts a timing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest

from todo_core.bench import __main__ as cli
from todo_core.bench import fidelity_level as level
from todo_core.bench import report
from todo_core.bench.comfyui_path import PACK_ROOT
from todo_core.calibrate import CANDIDATE_FACTORS, NOISE_BANDS


def test_fidelity_is_a_level_of_the_one_command():
    assert cli.parse_levels(["fidelity"]) == ("fidelity",)
    assert "fidelity" in cli.parse_levels(["all"])
    assert cli.README_SECTIONS["fidelity"] == "bench-fidelity"
    quick = cli.PRESETS["quick"].fidelity
    assert quick.scales == (2.0,) and quick.resolutions("sd15") == (1024,) and quick.resolutions("sdxl") == (2048,)
    assert quick.headline_max_error in quick.max_errors
    assert all(s in level.full_unets() for s in quick.models)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset's attention part (its ComfyUI part is the model-level test's), README section included."""
    pytest.importorskip("skimage", reason="the benchmark's tokens come from scikit-image's photos")
    out = tmp_path_factory.mktemp("fidelity")
    readme = out / "README.md"
    start, end = report.readme_markers("bench-fidelity")
    readme.write_text(f"before\n{start}\nold\n{end}\nafter\n")
    preset = cli.PRESETS["tiny"]
    with pytest.MonkeyPatch.context() as patch:
        without_comfyui = dataclasses.replace(preset.fidelity, model_runs=())
        patch.setitem(cli.PRESETS, "tiny", dataclasses.replace(preset, fidelity=without_comfyui))
        patch.setattr(cli, "README", readme)
        assert cli.main(["--preset", "tiny", "--levels", "fidelity", "--out-dir", str(out), "--update-readme"]) == 0
    return out, json.loads((out / "fidelity" / "results.json").read_text()), readme.read_text()


def test_the_level_writes_results_table_plot_and_readme_section(tiny_run):
    out, data, readme = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "fidelity"], "only the level asked for"
    assert {"meta", "layers", "timing", "summary", "comparisons", "render_cost", "model"} <= set(data)
    settings = {s["setting"] for s in data["summary"]}
    assert settings == {"exact", "auto", "manual x2", "manual x4", "fidelity 0.03", "fidelity 0.3"}
    text = (out / "fidelity" / "results.md").read_text()
    assert "| sd15 256² (0.5× native) | fidelity 0.3 |" in text and "calibration's cost" in text
    assert readme.startswith("before\n") and readme.endswith("after\n") and "old" not in readme
    assert "| sd15 256² (0.5× native) | manual x4 |" in readme
    if importlib.util.find_spec("matplotlib"):
        assert (out / "fidelity" / "results.png").stat().st_size > 10_000
        assert 'src="results.png"' in text


def test_fidelity_factors_are_the_modes_choices(tiny_run):
    """Within budget on the mode's own rows, and the largest candidate that is: the next one up costs more."""
    _, data, _ = tiny_run
    fidelity = [r for r in data["layers"] if r["family"] == "fidelity"]
    assert fidelity and any(r["factor"] > 1 for r in fidelity), "the loose budget reduces something"
    for r in fidelity:
        assert r["factor"] in (1.0, *CANDIDATE_FACTORS) and r["calibration_s"] > 0
        assert r["sampled_error"] <= r["value"]
        assert (r["factor"] == 1.0) == (r["error"] == 0.0)
    loose = {r["depth"]: r["factor"] for r in fidelity if r["value"] == 0.3}
    tight = {r["depth"]: r["factor"] for r in fidelity if r["value"] == 0.03}
    assert all(loose[d] >= tight[d] for d in tight), "a larger budget never keeps more keys here"
    auto = [r for r in data["layers"] if r["family"] == "auto"]
    assert auto and all(r["factor"] == 1.0 for r in auto), "auto leaves a model alone below its native size"
    paths = {(t["path"], t["factor"]) for t in data["timing"]}
    assert {(level.path_for("fidelity", r["factor"]), r["factor"]) for r in fidelity} <= paths
    assert ("attn1", 4.0) in paths and all(t["seconds"] > 0 for t in data["timing"])


def test_the_render_cost_counts_every_layer_and_band(tiny_run):
    _, data, _ = tiny_run
    (cost,) = data["render_cost"]
    assert cost["calibrations"] == 15 * len(NOISE_BANDS), "SD1.5: five self-attention layers at each of depths 1-3"
    assert cost["calibration_s"] == pytest.approx(
        sum(d["layers"] * d["calibration_s"] * len(NOISE_BANDS) for d in cost["depths"].values())
    )
    assert 0 < cost["share_of_attention"] < 1


def test_attention_layers_per_depth_of_the_full_unets():
    unets = level.full_unets()
    assert level.attention_layers_per_depth(unets["sd15"]) == {1: 5, 2: 5, 3: 5, 4: 1}
    assert level.attention_layers_per_depth(unets["sdxl"]) == {2: 10, 3: 60}, "SDXL's 70 transformer blocks"


def _setting(family: str, value: float | None, seconds: float, error: float) -> dict:
    return {"model": "sd15", "resolution": 1024, "family": family, "setting": level.setting_name(family, value),
            "value": value, "seconds": seconds, "error_mean": error, "error_max": error, "factors": {},
            "photos": 1, "speedup": 10.0 / seconds}  # fmt: skip


def test_comparisons_on_made_up_rows():
    summary = [_setting("exact", None, 10.0, 0.0), _setting("manual", 2.0, 4.0, 0.04),
               _setting("manual", 4.0, 2.0, 0.08), _setting("auto", None, 4.0, 0.04),
               _setting("fidelity", 0.03, 5.0, 0.02), _setting("fidelity", 0.2, 1.0, 0.1)]  # fmt: skip
    within, outside = level.comparisons(summary)
    # At error 2 %: halfway between exact (10 s) and manual x2 (4 s): 7 s, against fidelity's 5 s.
    assert within["equal_error_seconds"] == pytest.approx(7.0)
    assert within["equal_error_speedup"] == pytest.approx(1.4)
    assert within["equal_error_between"] == ["exact", "manual x2"]
    # At 5 s: a sixth of the way from manual x2 (4 s, 4 %) to exact (10 s, 0 %): 3.33 %, against fidelity's 2 %.
    assert within["equal_speed_error"] == pytest.approx(0.04 - 0.04 / 6)
    assert within["equal_speed_error_ratio"] == pytest.approx((0.04 - 0.04 / 6) / 0.02)
    assert within["vs_auto_speed"] == pytest.approx(0.8) and within["vs_auto_error"] == pytest.approx(2.0)
    assert outside["equal_error_speedup"] is None and outside["equal_speed_error_ratio"] is None, "beyond x4"


def test_summaries_sum_the_depths_and_average_the_photos():
    layers = [{"model": "sd15", "resolution": 1024, "depth": depth, "photo": photo, "family": family,
               "setting": level.setting_name(family, value), "value": value, "factor": factor, "error": error}
              for depth, photo, family, value, factor, error in [
                  (1, "a", "exact", None, 1.0, 0.0), (2, "a", "exact", None, 1.0, 0.0),
                  (1, "b", "exact", None, 1.0, 0.0), (2, "b", "exact", None, 1.0, 0.0),
                  (1, "a", "fidelity", 0.05, 2.0, 0.04), (2, "a", "fidelity", 0.05, 1.0, 0.0),
                  (1, "b", "fidelity", 0.05, 4.0, 0.02), (2, "b", "fidelity", 0.05, 2.0, 0.04)]]  # fmt: skip
    timing = [{"model": "sd15", "resolution": 1024, "depth": depth, "path": path, "factor": factor, "seconds": s}
              for depth, path, factor, s in [(1, "attn1", 1.0, 8.0), (2, "attn1", 1.0, 2.0),
                                             (1, "override", 2.0, 3.0), (1, "override", 4.0, 1.0),
                                             (2, "override", 2.0, 1.0)]]  # fmt: skip
    summary = {s["setting"]: s for s in level.summarise(layers, timing)}
    fidelity = summary["fidelity 0.05"]
    assert fidelity["seconds"] == pytest.approx(((3.0 + 2.0) + (1.0 + 1.0)) / 2), "photo a: 2 and 1; b: 4 and 2"
    assert fidelity["speedup"] == pytest.approx(10.0 / 3.5)
    assert fidelity["error_mean"] == pytest.approx(0.025) and fidelity["error_max"] == pytest.approx(0.04)
    assert fidelity["factors"] == {"1": [2.0, 4.0], "2": [1.0, 2.0]}
    assert level.interpolate([(0.0, 10.0), (1.0, 0.0)], 0.25) == (7.5, 0)
    assert level.interpolate([(0.0, 10.0), (1.0, 0.0)], 1.5) is None


def test_model_cost_extrapolates_to_twenty_steps():
    row = {"model": "sd15", "size": "256x256", "setting": "todo-fidelity-0.03", "steps": 4, "seconds": 11.0,
           "calibration_seconds": [4.0], "calibration_bands": [0, 1, 2], "calibration_report": "line"}  # fmt: skip
    (cost,) = level.model_cost([row, {**row, "setting": "unpatched", "calibration_seconds": None}])
    assert cost["share"] == pytest.approx(4.0 / 44.0)
    assert cost["share_of_20_steps"] == pytest.approx(4.0 / (4.0 + 20 * 10.0)), "10 s a step besides measuring"


@pytest.mark.comfyui
@pytest.mark.slow  # a full-size UNet built and a four-step render: about a minute on two loaded cores
def test_the_model_level_reads_the_renders_calibration(node, tmp_path):
    """Through ComfyUI: a few-step render in fidelity mode measures in every noise band and the row holds the
    seconds the render's own calibration spent, its decisions and its report line."""
    (run,) = cli.PRESETS["tiny"].fidelity.model_runs
    command = [sys.executable, str(cli.MODEL_RUNNER), "--comfyui", str(cli.find_comfyui()), "--attention",
               "pytorch", "--model", run.model, "--size", run.size, "--steps", str(run.steps), "--settings",
               "todo-fidelity-0.03"]  # fmt: skip
    status, rows = cli.run_child(command, cli.MMAP_ENV, lambda row: None)
    assert status == 0
    (row,) = rows
    assert row["steps"] == run.steps and row["seconds"] > 0
    assert row["calibration_bands"] == [0, 1, 2], "the first step of each band measures"
    (seconds,) = row["calibration_seconds"]
    assert 0 < seconds < row["seconds"] * run.steps
    assert "ToDo fidelity (max_error 0.03)" in row["calibration_report"]
    assert f"measuring took {seconds:.2f} s" in row["calibration_report"]
    depths = {d["depth"] for d in row["calibration_decisions"]}
    assert depths == {1, 2, 3} and all(d["factor"] in (1.0, *CANDIDATE_FACTORS) for d in row["calibration_decisions"])


def test_a_results_file_regenerates_the_same_tables(tiny_run, tmp_path):
    out, _, _ = tiny_run
    again = tmp_path / "again"
    assert cli.main(["--from-results", str(out / "fidelity" / "results.json"), "--out-dir", str(again)]) == 0
    assert (again / "fidelity" / "results.md").read_text() == (out / "fidelity" / "results.md").read_text()


COMMITTED = PACK_ROOT / "bench-results" / "fidelity" / "results.json"


def test_the_readme_section_is_the_committed_results():
    """Every figure of the README's fidelity section comes from the committed results file, as generated."""
    data = json.loads(COMMITTED.read_text())
    section = level.markdown(data, "bench-results/fidelity/results.png", "bench-results/results.png")
    start, end = report.readme_markers("bench-fidelity")
    readme = (PACK_ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{start}\n{section}\n{end}" in readme
    assert (PACK_ROOT / "bench-results" / "fidelity" / "results.png").is_file()
    assert data["meta"]["command"].startswith("python -m todo_core.bench --levels fidelity")
    assert {c["max_error"] for c in data["comparisons"]} == set(data["meta"]["max_errors"])


def test_the_readme_prose_quotes_the_committed_fidelity_results():
    """The example report line and the figures of the README's fidelity-mode section, from results.json."""
    import json
    import re
    from pathlib import Path

    from todo_core.bench.fidelity_level import headline

    root = Path(__file__).resolve().parents[1]
    readme = re.sub(r"\s+", " ", (root / "README.md").read_text(encoding="utf-8"))
    data = json.loads((root / "bench-results" / "fidelity" / "results.json").read_text(encoding="utf-8"))
    report = next(row["calibration_report"] for row in data["model"] if row["setting"] == "todo-fidelity-0.03")
    assert f"`{report}`" in readme
    row = next(r for r in headline(data)["rows"] if (r["model"], r["resolution"]) == ("sd15", 1024))
    sentence = (
        f"`max_error` 0.03 kept a mean attention error of {100 * row['error_mean']:.1f} % at {row['speedup']:.2f}× "
        f"the speed of exact attention, {row['equal_error_speedup']:.2f}× faster than fixed factors at the same "
        f"error; auto mode was {1 / row['vs_auto_speed']:.2f}× faster still, with {row['vs_auto_error']:.2f}× the "
        f"error. Measuring cost {100 * row['share_of_attention']:.1f} % of the attention time of a 20-step render."
    )
    assert sentence in readme, sentence
