"""Peak memory of one DPO training step, full fine-tuning vs LoRA, same model and batch.

    python benchmarks/lora_memory.py [--hidden 1024 --layers 8 --batch 4 --rank 8]

Each configuration runs in a fresh process (so one cannot inherit the other's allocations): it
builds the policy (and, for full fine-tuning, the reference copy) through train.build_models,
the BasicTrainer and its optimizer, and takes two optimizer steps of loss=dpo on the embedded
data. The peak is torch.cuda.max_memory_allocated on a GPU; on the CPU it is the process's peak
resident memory (ru_maxrss) minus its resident memory just before the models were built. Prints
one JSON line per configuration and the ratio LoRA / full (the issue asks for <= 0.6).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def overrides(args, lora: bool, run_dir: str):
    out = ["loss=dpo", "loss.beta=0.1", f"batch_size={args.batch}", f"max_length={args.length}",
           f"max_prompt_length={args.length // 2}", "sample_during_eval=false",
           "wandb.enabled=false", f"local_run_dir={run_dir}", "n_eval_examples=16",
           f"model.from_config.hidden_size={args.hidden}",
           f"model.from_config.intermediate_size={args.hidden * 3}",
           f"model.from_config.num_hidden_layers={args.layers}",
           f"model.from_config.num_attention_heads={args.hidden // 64}",
           f"model.from_config.num_key_value_heads={args.hidden // 64}"]
    if lora:
        out += [f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}",
                "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
    return out


def measure(args, lora: bool, extra=()) -> dict:
    """Runs in the child process: one configuration (plus `extra` overrides, e.g. another loss),
    two steps; returns its figures."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    import train
    import trainers
    import utils
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
            config = compose("config", overrides=overrides(args, lora, f"{tmp}/run") + list(extra))
        OmegaConf.resolve(config)
        train.validate_config(config, 1)
        tokenizer = utils.build_tokenizer("embedded")
        cuda = torch.cuda.is_available()
        baseline = torch.cuda.memory_allocated() if cuda else rss_bytes()
        policy, reference = train.build_models(config, tokenizer)
        trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir,
                                        reference_model=reference, tokenizer=tokenizer)
        del policy, reference
        trainer.build_optimizer()
        batches = iter(trainer.train_iterator())
        for _ in range(2):  # the optimizer state exists from the first step on
            loss = trainer.train_step(next(batches))["loss/train"]
        peak = (torch.cuda.max_memory_allocated() if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - baseline
        n_params = sum(p.numel() for p in trainer.policy.parameters())
        trainable = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    return {"config": "lora" if lora else "full", "device": "cuda" if cuda else "cpu",
            "peak_mib": round(peak / 2**20, 1), "parameters": n_params,
            "trainable": trainable, "loss": loss}


def model_arguments(description: str) -> argparse.ArgumentParser:
    """The measured model and batch, shared with reference_free_memory.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, default=1024, help="multiple of 64")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    return p


def run_children(script: str, kinds) -> dict:
    """kind -> the measurement of `script ARGS --child KIND`, each in a fresh process (printed)."""
    results = {}
    for kind in kinds:
        out = subprocess.run([sys.executable, script, *sys.argv[1:], "--child", kind],
                             capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, MKL_DYNAMIC="FALSE"))
        if out.returncode:
            sys.exit(f"{kind} run failed:\n{out.stderr[-3000:]}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[kind]))
    return results


def main():
    p = model_arguments(__doc__.strip().splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child == "lora")))
        return
    results = run_children(__file__, ("full", "lora"))
    ratio = results["lora"]["peak_mib"] / results["full"]["peak_mib"]
    print(json.dumps({"lora_over_full_peak": round(ratio, 3)}))


if __name__ == "__main__":
    main()
