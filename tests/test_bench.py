"""Smoke test of the benchmark harness on tiny shapes: it runs and measures; timings are never asserted."""

from __future__ import annotations

import json

from polyak.cli import main


def test_quick_bench_runs_and_reports_measured_columns(capsys, monkeypatch):
    monkeypatch.setattr("polyak.commands.bench.harness._SAMPLE_S", 0.001)  # timings are not checked: short samples
    assert main(["bench", "--quick", "--shapes", "many", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [shape["shape"] for shape in report["shapes"]] == ["many"]
    for shape in report["shapes"]:
        results = {r["name"]: r for r in shape["results"]}
        floor = results["floor: one lerp_ over a flat buffer"]
        assert floor["ops"] == 1 and floor["ratio"] > 0
        for name in ("polyak EMA", "polyak EMA, flatten_parameters", "polyak EMA, bf16 model, fp32 average"):
            assert results[name]["syncs"] == 0 and results[name]["alloc_mb"] == 0, name
        assert results["polyak EMA, flatten_parameters"]["ops"] == 1
        assert 0.9 < results["polyak EMA"]["extra_memory"] < 1.1  # one float32 copy of float32 parameters
        tutorial = results["torch AveragedModel, per-tensor avg_fn"]
        assert tutorial["alloc_mb"] > 0 and tutorial["syncs"] > 0  # the census sees what others do
    assert report["goals"][0].startswith("- many: not judged")  # a --quick stand-in: no goal of the full shape


def test_markdown_table(capsys, monkeypatch):
    monkeypatch.setattr("polyak.commands.bench.harness._SAMPLE_S", 0.001)
    assert main(["bench", "--quick", "--shapes", "gpt2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| polyak EMA |" in out and "x floor" in out and "Goals" in out


def test_rl_shapes_have_the_rl_rows_and_every_overhead_goal_is_printed(capsys, monkeypatch):
    monkeypatch.setattr("polyak.commands.bench.harness._SAMPLE_S", 0.001)
    assert main(["bench", "--quick", "--shapes", "sac", "dqn", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for shape in report["shapes"]:
        names = {r["name"]: r for r in shape["results"]}
        for row in ("stable-baselines3 polyak_update", "TorchRL SoftUpdate", "lightly update_momentum"):
            assert names[row]["note"] == "re-implemented", row
        assert names["bare _foreach_lerp_ over the same tensors"]["ops"] == 1
        assert shape["tensors"] == {"sac": 12, "dqn": 10}[shape["shape"]]
    goals = report["goals"]
    for shape in ("sac", "dqn"):
        assert any(line.startswith(f"- {shape}, polyak EMA: ") and "bare _foreach_lerp_" in line for line in goals)
        assert any(line.startswith(f"- {shape}, polyak EMA, flatten_parameters: ") for line in goals)
    verdicts = (": met", ": NOT met", "(goal 0.25)")  # a NOT met may say why after it
    assert all(any(v in line for v in verdicts) for line in goals if "goal <=" in line or "goal 0" in line)


def test_quick_names_the_shapes_as_run_and_judges_no_goal_of_a_full_shape(capsys, monkeypatch):
    monkeypatch.setattr("polyak.commands.bench.harness._SAMPLE_S", 0.001)
    assert main(["bench", "--quick", "--shapes", "many", "sac", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "### 200 small tensors (--quick): 200 tensors" in out and "2,000" not in out
    assert "### SAC twin critic" in out  # already small: run at full size in --quick too, and judged
    assert "- many: not judged, the goals are for the full shape" in out
    assert not [line for line in out.splitlines() if line.startswith("- many, ") and "met" in line]
    assert [line for line in out.splitlines() if line.startswith("- sac, polyak EMA: ") and "met" in line]


def test_every_goal_judges_rows_that_are_timed_and_the_floor_is_timed_first():
    """A goal whose row names are misspelt would be left out of the report without a word."""
    from polyak.commands.bench import sections
    from polyak.commands.bench.goals import FLOOR

    names = [contender.name for section in sections.SECTIONS for contender in section.CONTENDERS]
    assert names[0] == FLOOR and len(set(names)) == len(names)
    for goal in sections.goals():
        assert goal.subject in names and goal.reference in names, goal


def test_bench_select_prints_the_selection_against_the_hand_written_loop(capsys, monkeypatch):
    """``polyak bench --select``: the loop and select choose the same width (measure raises otherwise), and the
    ratio is printed with its goal; tiny sizes, timings not checked."""
    from polyak.commands.bench import selection

    measure = selection.measure
    monkeypatch.setattr("polyak.commands.bench.harness._SAMPLE_S", 0.001)
    monkeypatch.setattr(selection, "measure", lambda **kw: measure(**kw, layers=1, width=64, vocab=256, context=16))
    assert main(["bench", "--quick", "--shapes", "sac", "--repeats", "1", "--select"]) == 0
    out = capsys.readouterr().out
    assert "select / loop = " in out and "goal <= 0.6x" in out and "12 widths" in out
