"""`lit-open report`: the series and markers it extracts (rollbacks included), its files, and its errors; end to end on
two quickstart-recipe runs, one with injected faults, compared."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import cli_here, read_metrics, run_cli, tiny_overrides

from lit_open.commands.report import curve, final_metrics, markers, panels, read_trace, report, undone_rows
from lit_open.compose import load_command_config
from lit_open.errors import UserError
from lit_open.train.events import read_events

# a run rolled back from step 6 to step 3 (steps 4-6 trained again on later data), then trained on to step 8
STEPS = [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]
LOSSES = [6.0, 5.5, 5.0, 4.8, 9.0, 9.5, 4.7, 4.6, 4.5, 4.4, 4.3]
EVENTS = [
    {"step": 0, "event": "start"},
    {"step": 5, "event": "spike", "phase": "onset"},
    {"step": 3, "event": "rollback", "from_step": 6, "to_step": 3},
    {"step": 4, "event": "checkpoint", "path": "x"},
    {"step": 7, "event": "anneal", "phase": "start"},
]


def write_run(run_dir, steps=STEPS, losses=LOSSES, events=EVENTS) -> None:
    """A run directory as LitLM writes it: train rows in the order logged (tokens only grow), held-out rows."""
    (run_dir / "logs").mkdir(parents=True)
    with (run_dir / "logs" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "train/lr", "train/tokens", "val/loss"])
        writer.writeheader()
        writer.writerow({"step": 0, "val/loss": 6.5})
        for i, (step, loss) in enumerate(zip(steps, losses)):
            writer.writerow({"step": step, "train/loss": loss, "train/lr": 0.01, "train/tokens": 100 * (i + 1)})
            if step == 4:
                writer.writerow({"step": step, "val/loss": loss + 0.1})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_rows_a_later_row_at_the_same_or_an_earlier_step_follows_are_undone():
    assert undone_rows(STEPS) == [False] * 3 + [True] * 3 + [False] * 5
    # two rollbacks, each back to step 1: everything after the first step-1 row until the last rollback is undone
    assert undone_rows([1, 2, 3, 2, 3, 4, 2, 3]) == [False, True, True, True, True, True, False, False]
    assert undone_rows([]) == [] and undone_rows([1, 2, 3]) == [False] * 3


def test_a_rolled_back_curve_is_the_kept_trajectory_plus_the_undone_branch_as_it_happened(tmp_path):
    write_run(tmp_path)
    trace = read_trace(tmp_path)
    loss = curve(trace, "train/loss")
    assert loss.x == [1, 2, 3, 4, 5, 6, 7, 8]
    assert loss.y == [6.0, 5.5, 5.0, 4.7, 4.6, 4.5, 4.4, 4.3]
    assert loss.undone == [([3, 4, 5, 6], [5.0, 4.8, 9.0, 9.5])]  # branches off from step 3, where it went back to
    held_out = curve(trace, "val/loss")  # the first step-4 validation was undone with its step
    assert held_out.x == [0, 4] and held_out.y == pytest.approx([6.5, 4.8])
    ((branch_x, branch_y),) = held_out.undone
    assert branch_x == [0, 4] and branch_y == pytest.approx([6.5, 4.9])
    by_tokens = curve(trace, "train/loss", x="tokens")  # data only moves forward: the kept tokens skip the undone ones
    assert by_tokens.x == [100, 200, 300, 700, 800, 900, 1000, 1100]
    assert by_tokens.undone[0][0] == [300, 400, 500, 600]


def test_markers_sit_at_their_events_steps_by_kind_and_other_events_are_not_drawn(tmp_path):
    write_run(tmp_path)
    trace = read_trace(tmp_path)
    assert markers(trace) == {"spike": [5.0], "rollback": [3.0], "anneal": [7.0]}
    # on the tokens axis an event sits at the tokens of its step along the kept trajectory
    assert markers(trace, x="tokens") == {"spike": [800.0], "rollback": [300.0], "anneal": [1000.0]}


def test_final_metrics_are_the_kept_trajectorys_last_values(tmp_path):
    write_run(tmp_path)
    final = final_metrics(read_trace(tmp_path))
    assert final["train/loss"] == 4.3 and final["val/loss"] == pytest.approx(4.8)
    assert final["steps"] == 8 and final["train/tokens"] == 1100 and final["rollbacks"] == 1


def test_report_writes_a_png_and_a_page_with_both_runs_finals_and_events(tmp_path):
    import matplotlib.image

    write_run(tmp_path / "a")
    write_run(tmp_path / "b", losses=[x + 0.25 for x in LOSSES], events=EVENTS[:1])
    png, page = report([tmp_path / "a", tmp_path / "b"], labels=["mine", "reference"], x="tokens")
    assert png == tmp_path / "a" / "report" / "report.png" and page.name == "report.html"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width >= 1000 and height >= 300  # one row of panels: loss and learning rate
    text = page.read_text()
    assert "mine vs reference" in text and "4.3000" in text and "4.5500" in text
    events_table = text[text.index("<h2>Events</h2>") :]
    assert events_table.count("<tr><td>mine</td>") == len(EVENTS) and events_table.count("<tr><td>reference</td>") == 1
    assert '<td class="num">3</td><td>rollback</td><td>{&quot;from_step&quot;: 6, &quot;to_step&quot;: 3}' in text
    assert "data:image/png;base64," in text


def test_val_sources_get_a_loss_and_a_bits_per_byte_panel_and_their_final_values(tmp_path):
    (tmp_path / "logs").mkdir()
    held_out = {"val/loss": 6.0, "val/web/loss": 5.0, "val/code/loss": 7.0, "val/web/bits_per_byte": 1.5}
    with (tmp_path / "logs" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", *held_out])
        writer.writeheader()
        writer.writerows([{"step": 0, **held_out}, {"step": 1, "train/loss": 5.5}])
    (tmp_path / "events.jsonl").write_text("")
    trace = read_trace(tmp_path)
    assert panels([trace]) == [
        ("loss", ["train/loss", "val/loss"], False),
        ("held-out loss by source", ["val/web/loss", "val/code/loss"], False),
        ("held-out bits per byte", ["val/web/bits_per_byte"], False),
    ]
    final = final_metrics(trace)
    assert (final["val/code/loss"], final["val/web/bits_per_byte"]) == (7.0, 1.5)
    _, page = report([tmp_path])
    assert "<th>val/web/bits_per_byte</th>" in page.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare=[x]"], "needs run.dir="),
        (["run.dir=x", "colour=red"], "'colour=red' is not an option"),
        (["run.dir"], "'run.dir' is not an option"),
    ],
)
def test_bad_options_are_user_errors(args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_command_config("report", args)


def test_lists_and_bad_values(tmp_path):
    options = load_command_config("report", ["run.dir=a", "compare=[b, c]", "labels=['x',y,z]"])
    assert (options.run.dir, options.compare, options.labels) == ("a", ["b", "c"], ["x", "y", "z"])
    write_run(tmp_path / "a")
    with pytest.raises(UserError, match="x='time' is not an axis"):
        report([tmp_path / "a"], x="time")
    with pytest.raises(UserError, match="labels= names 2 runs but there are 1"):
        report([tmp_path / "a"], labels=["p", "q"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'} has no logs/metrics.csv"):
        report([tmp_path / "empty"])


# -- end to end -----------------------------------------------------------------------------------------------------

FAULTS = {  # a spike and a NaN injected; skip_step skips the NaN update: chaos and skip markers
    "plugins": "[chaos,skip_step]",
    "plugins.chaos.spike_steps": "[2]",
    "plugins.chaos.nan_steps": "[4]",
    "trainer.max_steps": 7,
}


@pytest.mark.slow
def test_report_on_two_quickstart_runs_through_the_cli(tiny_data, tmp_path):
    mine, reference = tmp_path / "mine", tmp_path / "reference"
    for run_dir, extra in ((mine, FAULTS), (reference, {"trainer.max_steps": 6})):
        trained = run_cli("train", *tiny_overrides(tiny_data, run_dir, **extra))
        assert trained.returncode == 0, trained.stderr[-3000:]

    result = run_cli("report", f"run.dir={mine}", f"compare=[{reference}]")
    assert result.returncode == 0, result.stderr[-3000:]
    png, page = mine / "report" / "report.png", mine / "report" / "report.html"
    assert result.stdout.split() == ["wrote", str(png), "wrote", str(page)]

    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width >= 1000 and height >= 600
    text = page.read_text()
    assert "mine vs reference" in text and str(mine) in text and str(reference) in text
    events = read_events(mine / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.count("chaos") == 2 and kinds.count("skip") == 1
    for event in events:  # a row per event, in order
        assert f'<td class="num">{event["step"]}</td><td>{event["event"]}</td>' in text
    for run_dir in (mine, reference):
        last = [float(r["train/loss"]) for r in read_metrics(run_dir) if r["train/loss"]][-1]
        assert f"{last:.4f}" in text

    trace = read_trace(mine)
    drawn = markers(trace)
    assert drawn["chaos"] == [float(e["step"]) for e in events if e["event"] == "chaos"]
    assert drawn["skip"] == [float(e["step"]) for e in events if e["event"] == "skip"]
    assert set(drawn) == {"chaos", "skip"}
    loss = curve(trace, "train/loss")
    assert loss.x == list(range(1, 8)) and not loss.undone  # the skipped update has no row: 8 batches, 7 steps


def test_a_missing_run_dir_exits_2_naming_it(tmp_path):
    result = cli_here("report", f"run.dir={tmp_path / 'nope'}")
    assert result.returncode == 2
    assert f"the run directory {tmp_path / 'nope'} does not exist" in result.stderr and "Traceback" not in result.stderr
