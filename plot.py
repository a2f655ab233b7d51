"""Pictures of one or more runs: `python plot.py RUN [RUN ...] --out fig.png` (PNG or SVG).

Reads each run's metrics.jsonl (and the eval.json that evaluate.py wrote into its checkpoints)
and draws one matplotlib figure: training and eval loss (SFT's summed negative log-likelihood,
~10-40, and the preference losses, ~0.7, on panels of their own so neither flattens the other),
reward accuracy, reward margins, chosen/rejected log-probs, KL to the reference where logged
(TDPO's kl_*; eval.json's KL of samples), and the reward of samples where evaluated. Each series of
a panel has its own line style; several runs get one colour each, a single run one colour per
series; the legend names both. A panel appears only when some run has data for it. No wandb needed.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402

X_KEY = "counters/examples"

# (title, y label, [(metric key, line label, line style)], the runs drawn: "sft", "preference" or
# None for all); keys are metrics.jsonl's, or "eval.json:<key>" for the mean of an entry of
# evaluate.py's output.
LOSS_LINES = [("loss/train", "train", "-"), ("loss/eval", "eval", "--")]
PANELS: List[Tuple[str, str, List[Tuple[str, str, str]], Optional[str]]] = [
    ("SFT loss", "negative log-likelihood", LOSS_LINES, "sft"),
    ("preference loss", "loss", LOSS_LINES, "preference"),
    ("reward accuracy", "accuracy", [("rewards_train/accuracies", "train", "-"),
                                     ("rewards_eval/accuracies", "eval", "--")], None),
    ("reward margin", "chosen - rejected reward", [("rewards_train/margins", "train", "-"),
                                                   ("rewards_eval/margins", "eval", "--")], None),
    ("log-probs (eval)", "summed log-prob", [("logps_eval/chosen", "chosen", "-"),
                                             ("logps_eval/rejected", "rejected", ":")], None),
    ("KL to the reference", "KL (nats)", [("kl_train/margin", "TDPO margin, train", "-"),
                                          ("kl_eval/chosen", "TDPO chosen, eval", "--"),
                                          ("kl_eval/rejected", "TDPO rejected, eval", ":"),
                                          ("eval.json:kl_k3", "samples (evaluate.py)", "-.")], None),
    ("reward of samples (evaluate.py)", "reward", [("eval.json:reward_policy", "policy", "-"),
                                                   ("eval.json:reward_reference", "reference", ":")], None),
]

Series = Dict[str, Tuple[List[float], List[float]]]


def run_root(path: Path) -> Path:
    """The run directory of a path (its parent, for a LATEST/ or step-N/ checkpoint)."""
    path = Path(path).resolve()
    return path.parent if path.name == "LATEST" or path.name.startswith("step-") else path


def read_metrics(run_dir: Path) -> Series:
    """{metric: (examples seen, values)} from metrics.jsonl, in the order logged."""
    series: Series = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        x = record.get(X_KEY)
        for key, value in record.items():
            if key != X_KEY and isinstance(value, (int, float)) and x is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(x)
                ys.append(value)
    return series


def read_evals(run_dir: Path) -> Series:
    """{"eval.json:<key>": (step, mean)} from every step-N/ and LATEST/ eval.json of a run."""
    points = []
    for path in Path(run_dir).glob("*/eval.json"):
        result = json.loads(path.read_text())
        if result.get("step") is not None:
            points.append(result)
    series: Series = {}
    for result in sorted(points, key=lambda r: r["step"]):
        for key, value in result.items():
            if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
                xs, ys = series.setdefault(f"eval.json:{key}", ([], []))
                xs.append(result["step"])
                ys.append(value["mean"])
    return series


def read_run(run_dir: Path) -> Series:
    series = read_metrics(run_dir)
    series.update(read_evals(run_dir))
    return series


def loss_kind(run_dir: Path, series: Series) -> str:
    """"sft" or "preference": the loss.name in the run's config.yaml, else whether the run logged
    reward metrics (every preference loss does; SFT has no rewards)."""
    config = Path(run_dir) / "config.yaml"
    if config.is_file():
        import yaml
        loss = (yaml.safe_load(config.read_text()) or {}).get("loss") or {}
        return "sft" if loss.get("name") == "sft" else "preference"
    return "preference" if any(key.startswith("rewards_") for key in series) else "sft"


def build_figure(run_dirs: Sequence[Path]):
    """The figure for these runs: one panel per PANELS entry that has data (see the module's
    docstring for colours and styles).

    Returns: the matplotlib Figure. Raises ValueError when no run has anything to draw.
    """
    roots = [run_root(d) for d in run_dirs]
    runs = [(root.name, loss_kind(root, series), series) for root, series in
            ((root, read_run(root)) for root in roots)]
    panels = [p for p in PANELS if any(key in series for _, kind, series in runs
                                       if p[3] in (None, kind) for key, _, _ in p[2])]
    if not panels:
        raise ValueError(f"none of {[str(d) for d in run_dirs]} has metrics to plot (no "
                         "metrics.jsonl or eval.json with known keys)")
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, lines, only) in zip(axes.flat, panels):
        for i, (name, kind, series) in enumerate(runs):
            for j, (key, label, style) in enumerate(lines):
                if key in series and only in (None, kind):
                    xs, ys = series[key]
                    # a colour per run; with one run, per series (styles alone are hard to tell apart)
                    colour = colours[(j if len(runs) == 1 else i) % len(colours)]
                    ax.plot(xs, ys, style, color=colour, marker="o" if len(xs) < 3 else None,
                            label=f"{name}: {label}")
        ax.set_title(title)
        ax.set_xlabel("training examples")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: Sequence, out_path) -> Path:
    """Draw the runs into out_path (.png or .svg). Returns the path written."""
    out = Path(out_path)
    if out.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"--out {out}: the figure is written as PNG or SVG; end the name in .png or .svg")
    fig = build_figure([Path(d) for d in run_dirs])
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", default="runs.png", help="output file, .png or .svg")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not Path(r).is_dir()]
    try:
        if missing:
            raise ValueError(f"{', '.join(missing)}: not a directory; pass run directories")
        out = plot_runs(args.runs, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
