"""plot.py: one figure of several runs, one panel per kind of metric that some run logged."""
import json
import struct
from pathlib import Path

import pytest

from conftest import FAST, ROOT, run_in_process

import plot

ALL_PANELS = ["loss", "reward accuracy", "reward margin", "log-probs (eval)", "KL to the reference",
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
    assert list(axes_data(fig)) == ["loss", "log-probs (eval)"]
    out = plot.plot_runs([sft / "LATEST"], tmp_path / "fig.svg")  # a checkpoint path names its run
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


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
    assert list(data) == ALL_PANELS[:5]  # no eval.json yet
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
