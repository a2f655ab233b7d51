"""Convert a checkpoint of this framework to Hugging Face format.

    python export_hf.py RUN_DIR/step-N [OUT_DIR]

writes config.json, model.safetensors and the tokenizer to OUT_DIR (default: the checkpoint
directory itself), so `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads the policy anywhere.
The model's architecture and tokenizer come from the config.yaml saved in the checkpoint.
"""
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import utils


def export(checkpoint_dir: str, out_dir: str = None) -> Path:
    checkpoint = Path(checkpoint_dir)
    config_path = checkpoint / "config.yaml"
    if not config_path.is_file():
        raise utils.ConfigError(f"{config_path} is missing: pass a step-N/ or LATEST/ directory "
                                "written by train.py")
    model_cfg = OmegaConf.load(config_path).model
    state = utils.load_policy_archive(str(checkpoint / "policy.pt"))
    tokenizer = utils.build_tokenizer(model_cfg.tokenizer_name_or_path or model_cfg.name_or_path,
                                      model_cfg.trust_remote_code)
    from_config = OmegaConf.to_container(model_cfg.from_config) if model_cfg.from_config else None
    # Only the architecture is needed: build it without allocating or loading weights.
    with torch.device("meta"):
        if from_config is None:
            import transformers
            config = transformers.AutoConfig.from_pretrained(
                model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
            skeleton = transformers.AutoModelForCausalLM.from_config(
                config, trust_remote_code=model_cfg.trust_remote_code)
        else:
            skeleton = utils.build_model(None, from_config, tokenizer, torch.float32)
    out = Path(out_dir) if out_dir else checkpoint
    out.mkdir(parents=True, exist_ok=True)
    utils.save_hf_format(skeleton, state, tokenizer, out)
    return out


def main(argv):
    if len(argv) not in (1, 2):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        out = export(*argv)
    except utils.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote Hugging Face files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
