"""The main job's report (quickstart.write_report) and the SVG charts: every number in the report
is the number in the run's files, and the charts put each point where its value says."""

import json
import re
import xml.etree.ElementTree as ET

import pytest

import quickstart
from plots import nice_ticks, svg_grouped_bars, svg_panels, svg_win_tie_loss

SVG = "{http://www.w3.org/2000/svg}"


def test_ticks_by_hand():
    assert nice_ticks(0, 1) == [0, 0.5, 1.0]
    assert nice_ticks(-2.546, -0.409) == [-3.0, -2.0, -1.0, 0.0]  # range 2.137 / 4 = 0.53: steps of 1
    assert nice_ticks(0, 36) == [0, 10, 20, 30, 40]
    assert nice_ticks(5, 5) == [4, 6, 8, 10]  # a flat series still gets an axis (5 to 10, steps of 2)


def test_points_land_where_their_values_say():
    svg = svg_panels("t", [("y", {"a": [(0, 0.0), (5, 0.5), (10, 1.0)], "b": [(0, 1.0), (10, float("nan"))]})], "x")
    root = ET.fromstring(svg)
    frame = next(r for r in root.iter(SVG + "rect") if r.get("fill") == "none")
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    w, h = float(frame.get("width")), float(frame.get("height"))
    line = next(root.iter(SVG + "polyline"))
    pts = [float(v) for p in line.get("points").split() for v in p.split(",")]
    # x axis 0..10, y axis 0..1: (0, 0) bottom left, (5, 0.5) the centre, (10, 1) top right.
    assert pts == pytest.approx([x0, y0 + h, x0 + w / 2, y0 + h / 2, x0 + w, y0], abs=0.06)
    assert sum(1 for _ in root.iter(SVG + "polyline")) == 1  # b has one finite point: a dot, no line


def test_bars_are_as_tall_as_their_values():
    root = ET.fromstring(svg_grouped_bars("t", ["m1", "m2"], {"A": [10.0, 5.0], "B": [2.5, 0.0]}))
    bars = {
        r.find(SVG + "title").text.split(":")[0]: float(r.get("height"))
        for r in root.iter(SVG + "rect")
        if r.find(SVG + "title") is not None
    }
    assert bars["A m2"] == pytest.approx(bars["A m1"] / 2, abs=0.1)
    assert bars["B m1"] == pytest.approx(bars["A m1"] / 4, abs=0.1) and bars["B m2"] == 0
    ET.fromstring(svg_win_tie_loss("t", [("x", {"win": 1, "tie": 0, "loss": 3, "unparsed": 2})]))


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def run(tmp_path):
    """A run's files as the stages write them, with numbers chosen to be recognisable."""
    write(
        tmp_path / "sft" / "metrics.jsonl",
        [
            {"step": 0, "val_loss": 8.25},
            {"step": 1, "loss": 7.5},
            {"step": 2, "loss": 6.5},
            {"step": 2, "val_loss": 6.125},
        ],
    )
    write(tmp_path / "samples.jsonl", [{"id": "a", "messages": [], "responses": ["x", "y"], "finished": [True, False]}])
    write(
        tmp_path / "rm" / "metrics.jsonl",
        [
            {"step": 0, "val_accuracy": 0.5, "val_margin": 0.0},
            {"step": 1, "loss": 0.6},
            {"step": 1, "val_accuracy": 0.75, "val_margin": 1.375},
        ],
    )
    round_ = dict(policy_loss=-0.01, value_loss=1.0, clip_fraction=0.0, response_len=40.0, unfinished=0.5)
    write(
        tmp_path / "ppo" / "metrics.jsonl",
        [
            dict(round_, round=1, step=8, score=-1.25, kl=0.0, kl_coef=0.1),
            dict(round_, round=2, step=16, score=0.625, kl=0.3125, kl_coef=0.099984),
        ],
    )
    for name, bleu in (("SFT", 1.5), ("PPO", 12.25)):
        bench = tmp_path / "eval" / f"bench_{name}"
        bench.mkdir(parents=True)
        (bench / "metrics.json").write_text(
            json.dumps({k: bleu if k == "BLEU-1" else 0.5 for k in quickstart.evaluate.TABLE2})
        )
        write(bench / "predictions.jsonl", [{"id": str(i)} for i in range(3)])
        write(
            tmp_path / "eval" / f"answers_{name}.jsonl",
            [
                {
                    "id": "q1",
                    "messages": [
                        {"role": "user", "content": "头痛"},
                        {"role": "assistant", "content": f"<HuatuoGPT>：{name}的回答"},
                    ],
                }
            ],
        )
    write(
        tmp_path / "eval" / "judge_answers.jsonl",
        [{"id": "q1", "group": "g", "outcome": "win"}, {"id": "q2", "group": "g", "outcome": "unparsed"}],
    )
    return tmp_path


def test_the_report_says_what_the_files_hold(run):
    report = quickstart.write_report(run, {"SFT": 10.0, "PPO": 5.0}).read_text(encoding="utf-8")
    assert "validation loss 8.250 before training, best 6.125 at step 2" in report
    assert "2 responses to 1 real-doctor prompts; 1 ended with eos, 1 were cut" in report
    assert (
        "accuracy 0.500 before training, best 0.750 at step 1 with a mean margin r(chosen) − r(rejected) of 1.375"
        in report
    )
    assert "| 2 | 16 | 0.625 | 0.312 | 0.099984 |" in report
    assert "| SFT | 3 | 1.50 |" in report and "| PPO | 3 | 12.25 |" in report
    assert "1 of 2 verdicts could not be parsed" in report and "| Total | 1 | 0 | 0 | 1 |" in report
    assert "| wall time (s) | 10 | 5 | 15 |" in report
    assert "&lt;HuatuoGPT&gt;：PPO的回答" in report  # model output cannot open a tag in Markdown
    for svg in re.findall(r"\]\((\w+\.svg)\)", report):
        ET.parse(run / svg)  # every plot the page shows exists and is well-formed
    assert set(re.findall(r"\]\((\w+\.svg)\)", report)) == {
        "sft_loss.svg",
        "rm.svg",
        "ppo.svg",
        "table2.svg",
        "win_tie_loss.svg",
    }
    # The figures are read, not remembered: change a file and the report changes with it.
    write(run / "sft" / "metrics.jsonl", [{"step": 0, "val_loss": 9.5}, {"step": 4, "val_loss": 7.0}])
    assert "best 7.000 at step 4" in quickstart.write_report(run, {}).read_text(encoding="utf-8")
    summary = quickstart.summary(run, run / "report.md", {"SFT": 10.2, "PPO": 5.0})
    assert "PPO          mean score -1.250 -> 0.625" in summary and "1 win, 0 tie, 0 loss, 1 unparsed" in summary
    assert "  time         SFT 10 s, PPO 5 s; 15 s in all" in summary  # issue 44 item 7: time per stage


def test_a_small_drift_is_drawn_as_small_and_said_in_words():
    """Issue 21: λ_KL went 0.1 -> 0.09994 and the axis ran 0.09994-0.1, so a 0.06% drift filled the
    panel like a fall."""
    lam = [(1, 0.1), (2, 0.09997), (3, 0.09994)]
    root = ET.fromstring(svg_panels("t", [("λ", {"λ_KL": lam}), ("loss", {"loss": [(1, 8.0), (3, 5.0)]})], "round"))
    frames = [r for r in root.iter(SVG + "rect") if r.get("fill") == "none"]
    lines = list(root.iter(SVG + "polyline"))
    ys = [float(p.split(",")[1]) for p in lines[0].get("points").split()]
    top, height = float(frames[0].get("y")), float(frames[0].get("height"))
    assert max(ys) - min(ys) < 0.01 * height  # 0.06% of 0.1 on an axis from 0: under a pixel or two
    assert abs(ys[0] - top) < 0.05 * height  # the value itself near the top of an axis 0 .. 0.1
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "λ_KL: 0.1 → 0.09994 (−0.06%)" in texts
    # A real change keeps an axis fitted to it, with nothing to annotate: the loss falls 8 -> 5.
    ys = [float(p.split(",")[1]) for p in lines[1].get("points").split()]
    assert ys[1] - ys[0] > 0.5 * float(frames[1].get("height"))
    assert not any(t and t.startswith("loss:") for t in texts)


def test_no_parsed_verdict_is_said_in_words_and_answers_that_differ_are_shown(run):
    """Issue 21: with nothing parsed the win/tie/loss chart was two lines of text and a legend for
    bars that were not there; "One question, both models" showed a question both answered alike."""
    write(run / "eval" / "judge_answers.jsonl", [{"id": "q1", "group": "g", "outcome": "unparsed"}] * 3)
    for name in ("SFT", "PPO"):
        write(
            run / "eval" / f"answers_{name}.jsonl",
            [
                {
                    "id": "same",
                    "messages": [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多休息"}],
                },
                {
                    "id": "other",
                    "messages": [
                        {"role": "user", "content": "咳嗽"},
                        {"role": "assistant", "content": f"{name}说多喝水"},
                    ],
                },
            ],
        )
    (run / "win_tie_loss.svg").write_text("<svg/>")  # an earlier run's chart goes
    report = quickstart.write_report(run, {}).read_text(encoding="utf-8")
    assert (
        "No verdict of the judge could be parsed, so there is no win/tie/loss chart: PPO vs. SFT, answers: "
        "3 unparsed." in report
    )
    assert "win_tie_loss.svg" not in report and not (run / "win_tie_loss.svg").exists()
    assert "differ on 1 of 2 questions" in report and "SFT说多喝水" in report and "PPO说多喝水" in report
    assert "**病人**：头痛" not in report  # the question both answered alike is not the example
    with pytest.raises(ValueError, match="no comparison has a parsed verdict"):
        svg_win_tie_loss("t", [("x", {"win": 0, "tie": 0, "loss": 0, "unparsed": 3})])
    legend = ET.fromstring(svg_win_tie_loss("t", [("x", {"win": 2, "tie": 0, "loss": 1, "unparsed": 0})]))
    assert [t.text for t in legend.iter(SVG + "text") if t.text in ("win", "tie", "loss")] == ["win", "loss"]
    for name in ("SFT", "PPO"):  # answered alike everywhere: one of them, and a sentence saying so
        write(
            run / "eval" / f"answers_{name}.jsonl",
            [
                {
                    "id": "same",
                    "messages": [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多休息"}],
                }
            ],
        )
    report = quickstart.write_report(run, {}).read_text(encoding="utf-8")
    assert "gave the same answer to each of the 1 questions" in report and "**病人**：头痛" in report


def test_the_main_job_never_replaces_an_earlier_run_silently(tmp_path, capsys):
    from safety import run_main

    (tmp_path / "sft").mkdir()
    (tmp_path / "report.md").write_text("an earlier report")
    assert run_main(quickstart.main, ["--out", str(tmp_path)]) == 2  # before any work
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path} holds an earlier run of the main job (sft, report.md): add --overwrite to replace it, "
        "or choose another --out"
    )
    assert (tmp_path / "report.md").read_text() == "an earlier report"
