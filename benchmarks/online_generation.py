#!/usr/bin/env python3
"""Generation throughput of online training (online.py) and its share of a training step.

1. Tokens per second of the answers online training samples (sampling.sample_token_ids: all
   prompts x samples of a batch in one batched, left-padded `generate` with the KV cache), against
   a plain transformers loop on the same model and prompts: one `model.generate` per prompt with
   num_return_sequences=samples, and transformers' own batched call on the same left-padded batch.
   All sample with temperature 1, top_p 1, no top-k, and count the tokens they generated up to and
   including EOS.
2. The share of online DPO's step time spent answering and judging: `python train.py loss=dpo
   online.enabled=true ...` on the embedded default, its logged time/generation against
   time/train_step.

    python benchmarks/online_generation.py [--archive RUN/LATEST/policy.pt] [--threads 2]

The last stdout line is one JSON object.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_policy(archive):
    """The embedded default's policy (model.archive=ARCHIVE when given) and tokenizer."""
    from hydra import compose, initialize_config_dir
    import train
    import utils
    overrides = ["loss=sft"] + ([f"model.archive={archive}"] if archive else [])
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        config = compose("config", overrides=overrides)
    m = config.model
    tokenizer = utils.build_model_tokenizer(m.name_or_path, m.tokenizer_name_or_path, m.gguf_file, False)
    policy, _ = train.build_models(config, tokenizer)
    return policy.eval(), tokenizer, config


def prompt_rows(tokenizer, config, n: int):
    import preference_datasets
    batch = next(preference_datasets.get_batch_iterator(
        ["synthetic"], tokenizer, split="test", batch_size=n, shuffle=False,
        max_length=config.max_length, max_prompt_length=config.max_prompt_length, n_epochs=1, silent=True))
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]


def ours(policy, tokenizer, rows, args):
    import sampling
    generation = dict(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    answers = sampling.sample_token_ids(policy, tokenizer, rows, args.samples, generation,
                                        len(rows) * args.samples, "cpu", progress=False)
    return sum(len(a) for a in answers)


def plain_loop(policy, tokenizer, rows, args):
    import torch
    eos, tokens = tokenizer.eos_token_id, 0
    for row in rows:
        with torch.no_grad():
            out = policy.generate(input_ids=torch.tensor([row]), do_sample=True, top_k=0,
                                  max_new_tokens=args.max_new_tokens, num_return_sequences=args.samples,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        for seq in out[:, len(row):].tolist():
            tokens += seq.index(eos) + 1 if eos in seq else len(seq)
    return tokens


def plain_batched(policy, tokenizer, rows, args):
    """transformers' own batched call on the same left-padded batch, without our wrapper."""
    import torch
    import sampling
    ids, mask = sampling.left_padded(rows, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                              max_new_tokens=args.max_new_tokens, num_return_sequences=args.samples,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    return sum(seq.index(eos) + 1 if eos in seq else len(seq) for seq in out[:, ids.shape[1]:].tolist())


def tokens_per_second(fn, policy, tokenizer, rows, args) -> float:
    """The median over repeats of generated tokens / seconds (one untimed warm-up call first)."""
    import torch
    torch.manual_seed(args.seed)
    fn(policy, tokenizer, rows, args)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tokens = fn(policy, tokenizer, rows, args)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def step_share(args) -> dict:
    """Online DPO on the embedded default: mean time/generation and time/train_step per step."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-u", "train.py", "loss=dpo", "loss.beta=0.1", "online.enabled=true",
               f"online.samples_per_prompt={args.samples}", f"online.max_new_tokens={args.max_new_tokens}",
               f"batch_size={args.prompts}", f"n_examples={args.train_examples}", "eval_every=1000000",
               "sample_during_eval=false", "save_hf_format=false", "minimum_log_interval_secs=0",
               *([f"model.archive={args.archive}"] if args.archive else []), f"local_run_dir={work}/run"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"training failed: {result.stderr[-2000:]}")
        rows = [json.loads(line) for line in (Path(work) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/generation" in r][1:]  # the first step warms up
    generation = statistics.mean(r["time/generation"] for r in steps)
    training = statistics.mean(r["time/train_step"] for r in steps)
    return {"steps": len(steps), "generation_s": generation, "train_step_s": training,
            "generation_share": generation / (generation + training), "command": " ".join(["python", *cmd[1:-1]])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", default=None, help="a policy.pt of the embedded default (e.g. the SFT run's)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per batch (the tiny preset's batch_size)")
    p.add_argument("--samples", type=int, default=2, help="answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-examples", type=int, default=1024, help="examples of the step-share run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    policy, tokenizer, config = tiny_policy(args.archive)
    rows = prompt_rows(tokenizer, config, args.prompts)
    result = {"ours_tokens_per_s": tokens_per_second(ours, policy, tokenizer, rows, args),
              "plain_loop_tokens_per_s": tokens_per_second(plain_loop, policy, tokenizer, rows, args),
              "plain_batched_tokens_per_s": tokens_per_second(plain_batched, policy, tokenizer, rows, args)}
    result["speedup"] = result["ours_tokens_per_s"] / result["plain_loop_tokens_per_s"]
    result["vs_batched"] = result["ours_tokens_per_s"] / result["plain_batched_tokens_per_s"]
    result.update(step_share(args), prompts=args.prompts, samples=args.samples,
                  max_new_tokens=args.max_new_tokens, threads=args.threads, archive=args.archive)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
