"""Peak memory of one training step, loss=dpo (policy + reference) vs loss=simpo (policy only),
same model, batch and optimizer.

    python benchmarks/reference_free_memory.py [--hidden 1024 --layers 8 --batch 4 --length 128]

Each loss runs in a fresh process through lora_memory.measure (train.build_models, the
BasicTrainer and its optimizer, two optimizer steps on the embedded data; the peak is
torch.cuda.max_memory_allocated on a GPU, else the peak resident memory above the resident
memory before the models were built). Prints one JSON line per loss and the ratio simpo / dpo.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LOSSES = {"dpo": [], "simpo": ["loss=simpo", "loss.beta=2.0"]}


def main():
    import lora_memory
    p = lora_memory.model_arguments(__doc__.strip().splitlines()[0])
    p.add_argument("--optimizer", default=None, help="e.g. RMSprop, SGD (default: the model preset's)")
    p.add_argument("--child", choices=list(LOSSES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        extra = LOSSES[args.child] + ([f"optimizer={args.optimizer}"] if args.optimizer else [])
        result = lora_memory.measure(argparse.Namespace(**vars(args), rank=0), False, extra)
        print(json.dumps(dict(result, config=args.child)))
        return
    results = lora_memory.run_children(__file__, LOSSES)
    print(json.dumps({"simpo_over_dpo_peak": round(results["simpo"]["peak_mib"] / results["dpo"]["peak_mib"], 3)}))


if __name__ == "__main__":
    main()
