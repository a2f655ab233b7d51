"""plot.py: one figure of several runs, one panel per kind of metric that some run logged."""
import json
import struct
from pathlib import Path

import pytest

from conftest import FAST, run_in_process

import plot

ALL_PANELS = ["preference loss", "reward accuracy", "reward margin", "log-probs (eval)", "KL to the reference",
              "reward of samples (evaluate.py)"]


def write_run(run_dir: Path, rows, evals=()):
    """A run directory with metrics.jsonl rows and LATEST/ or step-N/ eval.json files."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, result in evals:
        (run_dir / name).mkdir()
        (run_dir / name / "eval.json").write_text(json.dumps(result))
    return run_dir


def dpo_like(run_dir: Path, kl: bool):
    rows = []
    for step in (0, 32, 64):
        train = {"loss/train": 0.7 - step / 200, "rewards_train/accuracies": 0.5 + step / 200,
                 "rewards_train/margins": step / 100, "counters/examples": step + 8}
        evaluation = {"loss/eval": 0.69 - step / 300, "rewards_eval/accuracies": 0.5 + step / 300,
                      "rewards_eval/margins": step / 150, "logps_eval/chosen": -20 + step / 10,
                      "logps_eval/rejected": -21 - step / 10, "counters/examples": step}
        if kl:
            train["kl_train/margin"] = step / 50
            evaluation.update({"kl_eval/chosen": step / 40, "kl_eval/rejected": step / 30})
        rows += [evaluation, train]
    evals = [(name, {"step": step, "reward_policy": {"mean": 0.3 + step / 100, "se": 0.01},
                     "reward_reference": {"mean": 0.3, "se": 0.01}, "kl_k3": {"mean": step / 20, "se": 0.1}})
             for name, step in (("step-32", 32), ("LATEST", 64))]
    return write_run(run_dir, rows, evals if not kl else ())


def axes_data(fig):
    """{panel title: [(line label, number of points)]} of a figure."""
    return {ax.get_title(): [(line.get_label(), len(line.get_xdata())) for line in ax.get_lines()]
            for ax in fig.axes}


def png_size(path: Path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_two_runs_fill_every_panel_and_write_a_png(tmp_path):
    a = dpo_like(tmp_path / "dpo_run", kl=False)
    b = dpo_like(tmp_path / "tdpo_run", kl=True)
    fig = plot.build_figure([a, b])
    data = axes_data(fig)
    assert list(data) == ALL_PANELS
    for title, lines in data.items():
        assert lines and all(n > 0 for _, n in lines), title
    assert {label.split(":")[0] for lines in data.values() for label, _ in lines} == {"dpo_run", "tdpo_run"}
    assert ("tdpo_run: TDPO margin, train", 3) in data["KL to the reference"]
    assert ("dpo_run: samples (evaluate.py)", 2) in data["KL to the reference"]
    assert ("dpo_run: policy", 2) in data["reward of samples (evaluate.py)"]
    out = plot.plot_runs([a, b], tmp_path / "fig.png")
    width, height = png_size(out)
    assert (width, height) == (round(5.2 * 3 * 120), round(3.6 * 2 * 120))
    assert out.stat().st_size > 30_000  # six panels of lines and text, not an empty canvas


def test_panels_without_data_are_left_out_and_svg_works(tmp_path):
    sft = write_run(tmp_path / "sft", [{"loss/train": 9.0, "counters/examples": 8},
                                       {"loss/eval": 9.5, "logps_eval/chosen": -9.5, "counters/examples": 0}])
    fig = plot.build_figure([sft])
    assert list(axes_data(fig)) == ["SFT loss", "log-probs (eval)"]
    out = plot.plot_runs([sft / "LATEST"], tmp_path / "fig.svg")  # a checkpoint path names its run
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


def line_styles(fig, title):
    """{line label: (colour, line style, y values)} of one panel."""
    ax = next(a for a in fig.axes if a.get_title() == title)
    return {line.get_label(): (line.get_color(), line.get_linestyle(), list(line.get_ydata()))
            for line in ax.get_lines()}


def test_series_are_told_apart_and_each_loss_kind_has_its_own_axis(tmp_path):
    """One run: policy and reference sample rewards differ in colour and style; several runs: a
    colour per run, a style per series. SFT (~10-40) and DPO (~0.7) losses on separate panels."""
    dpo = dpo_like(tmp_path / "dpo", kl=False)
    one = line_styles(plot.build_figure([dpo]), "reward of samples (evaluate.py)")
    (policy_colour, policy_style, _), (reference_colour, reference_style, _) = (
        one["dpo: policy"], one["dpo: reference"])
    assert policy_colour != reference_colour and policy_style != reference_style
    sft = write_run(tmp_path / "sft", [{"loss/train": 30.0 - step, "counters/examples": step} for step in (8, 16)]
                    + [{"loss/eval": 25.0, "logps_eval/chosen": -25.0, "counters/examples": 16}])
    (tmp_path / "sft" / "config.yaml").write_text("loss:\n  name: sft\n")
    fig = plot.build_figure([sft, dpo])
    sft_loss, dpo_loss = line_styles(fig, "SFT loss"), line_styles(fig, "preference loss")
    assert set(sft_loss) == {"sft: train", "sft: eval"} and set(dpo_loss) == {"dpo: train", "dpo: eval"}
    assert max(y for *_, ys in dpo_loss.values() for y in ys) < 1 < min(y for *_, ys in sft_loss.values() for y in ys)
    (sft_colour, train_style, _), (_, eval_style, _) = sft_loss["sft: train"], sft_loss["sft: eval"]
    assert train_style != eval_style and {c for c, *_ in sft_loss.values()} == {sft_colour}
    assert {c for c, *_ in dpo_loss.values()} != {sft_colour}
    assert plot.loss_kind(sft, {}) == "sft" and plot.loss_kind(dpo, plot.read_run(dpo)) == "preference"


def test_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot.main([str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert "has metrics to plot (no metrics.jsonl" in capsys.readouterr().err
    assert plot.main([str(empty), "--out", str(tmp_path / "x.pdf")]) == 2
    assert "end the name in .png or .svg" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_real_sft_and_tdpo_runs(tmp_path):
    sft = run_in_process([*FAST, "n_examples=32", f"local_run_dir={tmp_path}/sft"])
    tdpo = run_in_process([*FAST, "n_examples=32", "loss=tdpo", "loss.beta=0.1", f"local_run_dir={tmp_path}/tdpo"])
    fig = plot.build_figure([sft, tdpo])
    data = axes_data(fig)
    assert list(data) == ["SFT loss", *ALL_PANELS[:5]]  # no eval.json yet
    for title, lines in data.items():
        assert lines and all(n > 0 for _, n in lines), title
    assert any(label.startswith("tdpo: TDPO") for label, _ in data["KL to the reference"])
    out = plot.plot_runs([sft, tdpo], tmp_path / "runs.png")
    assert out.stat().st_size > 30_000


def test_training_draws_its_plot_when_asked(tmp_path):
    run_dir = run_in_process([*FAST, "n_examples=16", "plot=true", f"local_run_dir={tmp_path}/run"])
    png = run_dir / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    quiet = run_in_process([*FAST, "n_examples=16", f"local_run_dir={tmp_path}/quiet"])
    assert not (quiet / "plot.png").exists()  # off by default
