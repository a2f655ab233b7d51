"""Peak host memory (RSS) of an FSDP run on CPU: one process against two, for each checkpoint
format, training and then resuming a ~85M-parameter Llama built from its config (docs/performance.md,
"FSDP host memory", quotes the numbers).

    python benchmarks/fsdp_host_memory.py [--out-dir DIR]

Each configuration is launched with torchrun; the resident set of every process of the launch
(torchrun's agent excluded) is sampled every 0.1 s, and each rank's peak during start-up (until
the models are built and sharded) and over the whole run, and the largest sum over the processes,
are reported, for the first run (build, train, save) and for a relaunch that resumes from its
step checkpoint.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ~85M parameters: 12 blocks of 768 wide with 2048-wide MLPs (the embedded tokenizer's small
# vocabulary adds little), float32, AdamW.
MODEL = ["model=tiny", "model.from_config.hidden_size=768",
         "model.from_config.intermediate_size=2048", "model.from_config.num_hidden_layers=12",
         "model.from_config.num_attention_heads=12", "model.from_config.num_key_value_heads=12"]
RUN = ["loss=sft", "trainer=FSDPTrainer", "n_examples=16", "batch_size=8", "eval_batch_size=8",
       "n_eval_examples=8", "eval_every=8", "max_length=64", "max_prompt_length=32",
       "sample_during_eval=false", "do_first_eval=false", "save_hf_format=false",
       "wandb.enabled=false"]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int):
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def local_rank(pid: int):
    """A torchrun worker's LOCAL_RANK, or None (not a worker, or gone)."""
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"LOCAL_RANK="):
                return int(item[len(b"LOCAL_RANK="):])
    except (OSError, ValueError):
        pass
    return None


def launch(nproc: int, args, log: Path):
    """Peak RSS in MiB of one torchrun launch: (start-up peak of each rank, whole-run peak of each
    rank, peak of all processes together). Start-up ends when train.py opens the run directory,
    which it does once every rank has built and sharded its models."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "train.py", *MODEL, *RUN, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    startup, whole, peak_sum, started = [0] * nproc, [0] * nproc, 0, False
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            sizes = {}
            for pid in children(proc.pid):
                rank = local_rank(pid)
                if rank is not None:
                    sizes[rank] = rss_kib(pid)
            started = started or "run directory:" in log.read_text()
            for rank, size in sizes.items():
                whole[rank] = max(whole[rank], size)
                if not started:
                    startup[rank] = max(startup[rank], size)
            peak_sum = max(peak_sum, sum(sizes.values()))
            time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return [k / 1024 for k in startup], [k / 1024 for k in whole], peak_sum / 1024


def mib(values) -> str:
    return " / ".join(f"{v:,.0f}" for v in values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out-dir", default=None)
    out_dir = Path(parser.parse_args().out_dir or tempfile.mkdtemp(prefix="fsdp-memory-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print("| processes | checkpoint_format | phase | start-up peak, rank 0 / 1 (MiB) | "
          "peak, rank 0 / 1 (MiB) | peak, all processes (MiB) |")
    print("|---|---|---|---|---|---|")
    for fmt in ("full", "sharded"):
        for nproc in (1, 2):
            run_dir = out_dir / f"{fmt}-{nproc}"
            args = [f"checkpoint_format={fmt}", f"local_run_dir={run_dir}"]
            first = launch(nproc, args, out_dir / f"{fmt}-{nproc}-train.log")
            shutil.rmtree(run_dir / "LATEST")  # the relaunch resumes from step-8
            resumed = launch(nproc, args, out_dir / f"{fmt}-{nproc}-resume.log")
            for phase, (startup, whole, total) in (("train", first), ("resume", resumed)):
                print(f"| {nproc} | {fmt} | {phase} | {mib(startup)} | {mib(whole)} | "
                      f"{total:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
