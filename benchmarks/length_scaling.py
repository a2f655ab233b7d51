#!/usr/bin/env python3
"""Time and peak memory per pair as sequences grow: ours (dpo_throughput.py) and TRL's DPOTrainer
(trl_dpo_baseline.py), side by side at each length, under one address-space cap so that a run
that would exhaust the machine fails with an allocation error instead (reported as "out of
memory").

Each pair has a prompt of half the sequence length and two responses of half each, so every
sequence (prompt + response) has exactly the listed number of tokens. The model is the benchmarks'
Llama (hidden 256, 4 layers) with a 150k vocabulary, one pair per step.

    python benchmarks/length_scaling.py                       # 1k, 2k, 4k, 8k tokens, 20 GiB cap
    python benchmarks/length_scaling.py --lengths 1024 2048 --memory-cap-gb 16

The last stdout line is one JSON object: {"runs": [{framework, seq_len, s_per_pair, peak_rss_mb
or error}, ...]}; a Markdown table is printed before it.
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"ours": HERE / "dpo_throughput.py", "TRL": HERE / "trl_dpo_baseline.py"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--vocab", type=int, default=150_000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--memory-cap-gb", type=float, default=20.0)
    p.add_argument("--timeout-s", type=int, default=1200, help="per run")
    p.add_argument("--frameworks", nargs="+", choices=sorted(SCRIPTS), default=list(SCRIPTS))
    return p.parse_args(argv)


def run_one(framework: str, seq_len: int, args) -> dict:
    cap = int(args.memory_cap_gb * 2 ** 30)

    def limit():  # in the child only
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, str(SCRIPTS[framework]), "--vocab", str(args.vocab), "--batch", "1",
           "--prompt-len", str(seq_len // 2), "--response-len", str(seq_len - seq_len // 2),
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    row = {"framework": framework, "seq_len": seq_len}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit,
                              timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"over {args.timeout_s} s"}
    if done.returncode != 0:
        text = done.stdout + done.stderr
        memory = any(s in text for s in ("MemoryError", "can't allocate memory",
                                         "DefaultCPUAllocator", "Cannot allocate memory"))
        return {**row, "error": "out of memory" if memory else text.strip().splitlines()[-1][:200]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "s_per_pair": round(1.0 / result["examples_per_s"], 3),
            "peak_rss_mb": result["peak_rss_mb"]}


def table(runs) -> str:
    lines = ["| tokens per sequence | ours: s / pair | ours: peak RSS | TRL: s / pair | TRL: peak RSS |",
             "|---|---|---|---|---|"]
    for seq_len in sorted({r["seq_len"] for r in runs}):
        cells = []
        for framework in SCRIPTS:
            r = next((r for r in runs if r["seq_len"] == seq_len and r["framework"] == framework),
                     {"error": "not run"})
            cells += ([r["error"], "-"] if "error" in r
                      else [f"{r['s_per_pair']:.2f}", f"{r['peak_rss_mb'] / 1024:.1f} GB"])
        lines.append(f"| {seq_len:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    runs = []
    for seq_len in args.lengths:
        for framework in args.frameworks:
            runs.append(run_one(framework, seq_len, args))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    print(table(runs))
    print(json.dumps({"runs": runs, "vocab": args.vocab, "memory_cap_gb": args.memory_cap_gb}))


if __name__ == "__main__":
    main()
