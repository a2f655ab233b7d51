"""What content hashes cost a checkpoint write: checkpoints.write_checkpoint of a 135M-parameter
model (SmolLM2-135M's shape built from its config: policy, AdamW's two moments, a scheduler),
with the hashes (as train.py writes) and with hashing switched off, alternating, in one process
(docs/resuming.md quotes the numbers).

    python benchmarks/checkpoint_hashing.py [--rounds 3] [--dir DIR]

DIR (default: a temporary directory beside this repository, on its disk) must hold ~3.3 GB.
Each write starts after os.sync(), so the previous one's writeback does not count against it.
Reports each write's wall and CPU seconds, the medians and their ratios.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402

# HuggingFaceTB/SmolLM2-135M's config.json (the embeddings are tied: 134.5M parameters).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True)


class PlainWriter(checkpoints.HashingWriter):
    """HashingWriter without the hash: the write path as it was before content hashes."""

    def write(self, data) -> int:
        return self.file.write(data)


def states() -> dict:
    import transformers
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M))
    policy = model.state_dict()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    optimizer = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                               "exp_avg_sq": torch.rand_like(p)}
                           for i, p in enumerate(model.parameters())},
                 "param_groups": [{"lr": 1e-6, "params": list(range(len(policy)))}]}
    return {"policy.pt": policy, "optimizer.pt": optimizer, "scheduler.pt": {"last_epoch": 1}}


def write(run_dir: Path, saved: dict, hashing: bool) -> tuple:
    """(wall seconds, CPU seconds of this process) of one write_checkpoint."""
    real_writer, real_manifest = checkpoints.HashingWriter, checkpoints.write_manifest
    if not hashing:
        checkpoints.HashingWriter = PlainWriter
        checkpoints.write_manifest = lambda directory, hashes: None
    try:
        os.sync()  # the previous write's dirty pages are on disk before the clock starts
        start, cpu = time.perf_counter(), time.process_time()
        checkpoints.write_checkpoint(run_dir, "step-8", saved, 8, {}, {"example_counter": 8})
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        checkpoints.HashingWriter, checkpoints.write_manifest = real_writer, real_manifest


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    saved = states()
    run_dir = Path(tempfile.mkdtemp(prefix="ckpt-hash-", dir=args.dir or ROOT.parent))
    times = {True: [], False: []}  # hashing: [(wall, CPU), ...]
    try:
        write(run_dir, saved, True)  # warm-up: allocator, page cache, first file creation
        size = sum(checkpoints.file_sizes(run_dir / "step-8").values())
        print(f"checkpoint: {size / 1e9:.2f} GB")
        for i in range(args.rounds):  # alternating which goes first
            for hashing in ((False, True) if i % 2 == 0 else (True, False)):
                times[hashing].append(write(run_dir, saved, hashing))
                wall, cpu = times[hashing][-1]
                print(f"{'hashed' if hashing else 'plain '}: {wall:.2f} s ({cpu:.2f} s CPU)",
                      flush=True)
        start = time.perf_counter()  # the hash alone, for scale: the files read back, hashed
        for name in checkpoints.file_sizes(run_dir / "step-8"):
            checkpoints.hash_file(run_dir / "step-8" / name)
        print(f"hash_file of every file (from the page cache): {time.perf_counter() - start:.2f} s")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    for k, what in enumerate(("wall", "CPU")):
        plain = statistics.median(t[k] for t in times[False])
        hashed = statistics.median(t[k] for t in times[True])
        print(f"median {what}: plain {plain:.2f} s, hashed {hashed:.2f} s, "
              f"ratio {hashed / plain:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
