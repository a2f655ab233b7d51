#!/usr/bin/env python3
"""The reward-KL frontier in miniature (the DPO paper's Figure 2, on the embedded default).

One SFT run on the synthetic tasks, then preference runs from that SFT checkpoint: DPO at several
beta, IPO, TDPO2 and, where config/loss/ has them, a few of TRL's losses. Each checkpoint of each
run (step-N/ and LATEST/) is scored by evaluate.py against the SFT model with the ground-truth
synthetic reward: one point (KL(pi || pi_ref) of the policy's samples, mean reward of its samples).
The SFT model itself is the point at KL = 0.

    python benchmarks/frontier.py                 # writes docs/frontier.png, .md and .json
    python benchmarks/frontier.py --quick         # a smaller run to try the script (~1/4 the time)

Training runs `python -u train.py ...` as a user would; evaluation calls evaluate.evaluate on a
config composed from config/evaluate.yaml (the same code as `python evaluate.py ...`, without
starting a new interpreter per checkpoint). The last stdout line is one JSON object.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, family, loss overrides). A family is drawn in one colour; its runs differ in beta.
METHODS = [
    ("DPO b=0.03", "DPO", ["loss=dpo", "loss.beta=0.03"]),
    ("DPO b=0.1", "DPO", ["loss=dpo", "loss.beta=0.1"]),
    ("DPO b=0.3", "DPO", ["loss=dpo", "loss.beta=0.3"]),
    ("DPO b=1", "DPO", ["loss=dpo", "loss.beta=1.0"]),
    ("IPO b=0.1", "IPO", ["loss=ipo", "loss.beta=0.1"]),
    ("TDPO2 b=0.1", "TDPO2", ["loss=tdpo", "loss.beta=0.1", "loss.alpha=0.5"]),
    ("TDPO2 b=0.3", "TDPO2", ["loss=tdpo", "loss.beta=0.3", "loss.alpha=0.5"]),
]
# TRL's losses, run when the loss zoo provides their config/loss/NAME.yaml
OPTIONAL_METHODS = [
    ("hinge b=0.1", "TRL hinge", "hinge", ["loss=hinge", "loss.beta=0.1"]),
    ("robust b=0.1", "TRL robust", "robust", ["loss=robust", "loss.beta=0.1", "loss.label_smoothing=0.1"]),
]
QUICK_METHODS = ("DPO b=0.1", "DPO b=1", "TDPO2 b=0.1")
# --online: DPO on the dataset's pairs against DPO on the policy's own answers ranked by the
# synthetic reward (online DPO, Guo et al. 2024, arXiv 2402.04792) and iterative DPO in 3 rounds
# (Xiong et al. 2024, arXiv 2312.11456): an epoch is 187 batches of 32, so 3 rounds of 63 batches
# for one epoch (the figure's settings), of 125 for two (--preset), the reference reset to the
# policy at each round's start. Same SFT model, same prompts seen.
def online_methods(round_batches: int):
    return [("offline DPO b=0.1", "offline DPO", ["loss=dpo", "loss.beta=0.1"]),
            ("online DPO b=0.1", "online DPO", ["loss=dpo", "loss.beta=0.1", "online.enabled=true"]),
            ("iterative DPO b=0.1", "iterative DPO",
             ["loss=dpo", "loss.beta=0.1", "online.enabled=true", f"online.generate_every={round_batches}",
              "online.reference_follows=true"])]


# The tiny preset's training settings when docs/frontier.* were made (issue 28 changed the preset's),
# so that the benchmark still reproduces the published figure.
FIGURE_SETTINGS = ["lr=1e-3", "warmup_steps=20", "max_grad_norm=10.0", "n_epochs=1", "eval_every=2048"]


def train(run_dir: Path, overrides, log, preset: bool = False) -> str:
    """`python -u train.py OVERRIDES local_run_dir=RUN_DIR`; stops the benchmark if it fails.
    Returns the command line as a user would type it."""
    cmd = [sys.executable, "-u", "train.py", *([] if preset else FIGURE_SETTINGS), *overrides,
           f"local_run_dir={run_dir}", "wandb.enabled=false", "sample_during_eval=false"]
    shown = " ".join(["python", *cmd[1:]])
    log(shown)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return shown


def commands_markdown(script_line: str, train_commands, eval_overrides, work: Path) -> str:
    """The exact commands behind the table, with the work directory written WORK."""
    evaluate = ("python evaluate.py checkpoint=WORK/RUN/CHECKPOINT reference=WORK/sft/LATEST reward=synthetic "
                + " ".join(eval_overrides))
    lines = [line.replace(str(work), "WORK") for line in train_commands]
    return (f"Made by `{script_line}`, which ran these commands (WORK is `--work-dir`; each evaluation "
            "runs `evaluate.py`'s code in-process, once for every `step-N/` and `LATEST/` of every run, "
            "and for the SFT model itself):\n\n"
            + "".join(f"    {line}\n" for line in [*lines, evaluate]))


def checkpoints(run_dir: Path):
    """step-N/ in order, then LATEST/."""
    steps = sorted(run_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return [*steps, run_dir / "LATEST"]


def evaluate_checkpoint(checkpoint: Path, reference: Path, eval_overrides):
    """evaluate.py's results for one checkpoint (also written to its eval.json)."""
    import evaluate
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("evaluate", overrides=[f"checkpoint={checkpoint}", f"reference={reference}",
                                             "reward=synthetic", *eval_overrides])
    return evaluate.evaluate(cfg)


def point(label: str, family: str, checkpoint: Path, results: dict) -> dict:
    return {"label": label, "family": family, "checkpoint": checkpoint.name, "step": results["step"],
            "kl": results["kl_per_position"]["mean"], "kl_se": results["kl_per_position"]["se"],
            "kl_log_ratio": results["kl_log_ratio"]["mean"], "kl_log_ratio_se": results["kl_log_ratio"]["se"],
            "reward": results["reward_policy"]["mean"], "reward_se": results["reward_policy"]["se"],
            "win_vs_reference": results["win_rate_vs_reference"]["mean"],
            "win_vs_reference_ci": results["win_rate_vs_reference"]["ci95"],
            "implicit_accuracy": results["implicit_accuracy"]["mean"]}


def draw(points, out_path: Path, title: str):
    """Reward against KL: one line per run through its checkpoints, one colour per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    families = list(dict.fromkeys(p["family"] for p in points))
    markers = "os^vDP*X<>"
    labels = list(dict.fromkeys(p["label"] for p in points))
    for label in labels:
        run = [p for p in points if p["label"] == label]
        family = run[0]["family"]
        colour = colours[families.index(family) % len(colours)]
        same_family = [line for line in labels if next(p for p in points if p["label"] == line)["family"] == family]
        marker = "*" if family == "SFT" else markers[same_family.index(label) % len(markers)]
        ax.errorbar([p["kl"] for p in run], [p["reward"] for p in run],
                    xerr=[p["kl_se"] or 0 for p in run], yerr=[p["reward_se"] or 0 for p in run],
                    color=colour, marker=marker, markersize=12 if family == "SFT" else 6,
                    linestyle="-" if len(run) > 1 else "none", linewidth=1, capsize=2, label=label)
    ax.set_xlabel("KL(policy || SFT reference) of the policy's samples, nats (per-position estimate)")
    ax.set_ylabel("mean synthetic-task reward of samples")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)


def table(points) -> str:
    lines = ["| run | checkpoint | KL (per-position) | KL (log-ratio) | reward | win rate vs SFT [95% CI] "
             "| implicit acc. |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        ci = p["win_vs_reference_ci"]
        lines.append(f"| {p['label']} | {p['checkpoint']} | {p['kl']:.2f} ± {p['kl_se'] or 0:.2f} | "
                     f"{p['kl_log_ratio']:.2f} ± {p['kl_log_ratio_se'] or 0:.2f} | "
                     f"{p['reward']:.3f} ± {p['reward_se'] or 0:.3f} | "
                     f"{p['win_vs_reference']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {p['implicit_accuracy']:.3f} |")
    return "\n".join(lines)


ONLINE_SECTION = "\n## Online and iterative DPO, added by `python benchmarks/frontier.py --online`\n"


def add_to_frontier(out_dir: Path, points) -> bool:
    """Add --online's online and iterative DPO points to frontier.{json,png,md}, only when its SFT
    model scored exactly as the figure's (the same SFT checkpoint, so the same reference and axes);
    a previous --online addition is replaced. Returns whether they were added."""
    path = out_dir / "frontier.json"
    if not path.is_file():
        return False
    base = json.loads(path.read_text())
    sft = [p for p in base["points"] if p["family"] == "SFT"]
    if not sft or sft[0]["reward"] != points[0]["reward"] or sft[0]["kl"] != points[0]["kl"]:
        return False
    online = ("online DPO", "iterative DPO")
    added = [p for p in points if p["family"] in online]
    base["points"] = [p for p in base["points"] if p["family"] not in online] + added
    path.write_text(json.dumps(base, indent=1))
    draw(base["points"], out_dir / "frontier.png", base["title"])
    md = (out_dir / "frontier.md").read_text().split(ONLINE_SECTION)[0]
    (out_dir / "frontier.md").write_text(md + ONLINE_SECTION + "\nFrom the same SFT model (see frontier_online.md "
                                         "for its commands):\n\n" + table(added) + "\n")
    return True


def methods(quick: bool, online: bool = False, preset: bool = False):
    if online:
        return online_methods(125 if preset else 63)
    available = {p.stem for p in (ROOT / "config" / "loss").glob("*.yaml")}
    chosen = [m for m in METHODS if not quick or m[0] in QUICK_METHODS]
    if not quick:
        chosen += [(label, fam, over) for label, fam, name, over in OPTIONAL_METHODS if name in available]
    return chosen


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "docs"), help="where frontier.{png,md,json} go")
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary directory, removed)")
    parser.add_argument("--quick", action="store_true", help="fewer runs, prompts and examples")
    parser.add_argument("--online", action="store_true",
                        help="offline vs online vs iterative DPO instead (writes frontier_online.*)")
    parser.add_argument("--preset", action="store_true",
                        help="with --online: the tiny preset's own training settings, not the figure's "
                             "(writes frontier_online_preset.*)")
    parser.add_argument("--n-prompts", type=int, default=None, help="evaluation prompts (default 128; quick 32)")
    parser.add_argument("--n-samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    script_line = " ".join(["python benchmarks/frontier.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)  # noqa: E731
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="frontier-"))
    script_line = script_line.replace(str(args.work_dir), "WORK") if args.work_dir else script_line
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_prompts = args.n_prompts or (32 if args.quick else 128)
    length = ["n_examples=2048", "eval_every=1024"] if args.quick else ["eval_every=2048"]
    length = [] if args.preset else length
    eval_overrides = [f"n_prompts={n_prompts}", f"n_samples={args.n_samples}", "max_new_tokens=16",
                      f"seed={args.seed}", "batch_size=128"]
    seed = [f"seed={args.seed}"]
    sft = work / "sft"
    commands = [train(sft, [*seed, *(["n_examples=4096"] if args.quick else [])], log, args.preset)]
    reference = sft / "LATEST"
    points = [point("SFT", "SFT", reference, evaluate_checkpoint(reference, reference, eval_overrides))]
    log(f"SFT: reward {points[0]['reward']:.3f}")
    for label, family, overrides in methods(args.quick, args.online, args.preset):
        run_dir = work / label.replace(" ", "_").replace("=", "")
        commands.append(train(run_dir, [*seed, *overrides, *length, f"model.archive={reference}/policy.pt"], log,
                              args.preset))
        for checkpoint in checkpoints(run_dir):
            points.append(point(label, family, checkpoint, evaluate_checkpoint(checkpoint, reference, eval_overrides)))
            log(f"{label} {checkpoint.name}: KL {points[-1]['kl']:.3f}, reward {points[-1]['reward']:.3f}")
    elapsed = time.time() - start
    title = (f"embedded default (synthetic tasks){' --quick' if args.quick else ''}: {n_prompts} held-out "
             f"prompts x {args.n_samples} samples,\nseed {args.seed}, {elapsed / 60:.1f} min on {os.cpu_count()} CPUs")
    name = ("frontier_online" + ("_preset" if args.preset else "")) if args.online else "frontier"
    draw(points, out_dir / f"{name}.png", title)
    commands_md = commands_markdown(script_line, commands, eval_overrides, work)
    (out_dir / f"{name}.md").write_text(f"{title.replace(chr(10), ' ')}\n\n{commands_md}\n{table(points)}\n")
    (out_dir / f"{name}.json").write_text(json.dumps({"points": points, "seconds": elapsed,
                                                      "quick": args.quick, "title": title}, indent=1))
    if args.online and not args.preset and not args.quick and add_to_frontier(out_dir, points):
        log("added the online and iterative DPO points to frontier.{json,png,md}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(table(points))
    print(json.dumps({"seconds": round(elapsed, 1), "points": len(points), "out": str(out_dir / f"{name}.png")}))


if __name__ == "__main__":
    main()
