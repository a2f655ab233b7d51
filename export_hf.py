"""Convert a checkpoint of this framework to Hugging Face format.

    python export_hf.py CHECKPOINT [OUT_DIR] [--trust-remote-code]

CHECKPOINT is a step-N/ or LATEST/ directory, or a run directory (its LATEST/ is used). Writes
config.json, model.safetensors and the tokenizer to OUT_DIR (default: the checkpoint directory
itself), so `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads the policy anywhere (a
vision-language model: `AutoModelForImageTextToText` and `AutoProcessor`). The model's
architecture and tokenizer come from the config.yaml saved in the checkpoint, and the weights are
checked against that architecture before anything is written; the files read are first checked
against the content hashes the checkpoint recorded when it was written (its manifest.json).

A checkpoint never decides whether code shipped with a model runs: its saved trust_remote_code is
ignored, and remote code runs only with --trust-remote-code on this command line.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

import checkpoints
import utils

OPTION = "export_hf.py CHECKPOINT"


def find_checkpoint(path: str) -> Path:
    """The checkpoint directory `path` means: itself, or a run directory's LATEST/."""
    given = Path(path)
    for candidate in (given, given / "LATEST"):
        if (candidate / "policy.pt").is_file() or checkpoints.is_sharded(candidate):
            if not (candidate / "config.yaml").is_file():
                raise utils.ConfigError(f"{OPTION}={path}: {candidate / 'config.yaml'} is missing; "
                                        "pass a step-N/ or LATEST/ directory written by train.py")
            return candidate
    if not given.exists():
        raise utils.ConfigError(f"{OPTION}={path} does not exist; pass a step-N/ or LATEST/ "
                                "directory written by train.py, or its run directory")
    raise utils.ConfigError(f"{OPTION}={path} holds no policy.pt (nor LATEST/policy.pt); pass a "
                            "step-N/ or LATEST/ directory written by train.py, or its run directory")


def verify(checkpoint: Path, given: str):
    """Check the files export reads against the checkpoint's manifest (checkpoints.verify_files);
    a damaged one is refused in one line naming it."""
    names = ["config.yaml", checkpoints.SHARDED_DIR if checkpoints.is_sharded(checkpoint)
             else "policy.pt"]
    if (checkpoint / "base_weights.pt").is_file():  # a LoRA checkpoint's base weights record
        names.append("base_weights.pt")
    try:
        checkpoints.verify_files(checkpoint, names)
    except checkpoints.DamagedCheckpoint as e:
        raise utils.ConfigError(f"{OPTION}={given}: {e}") from None


def saved_model_config(saved, trust_remote_code: bool):
    """A checkpoint's model config with the keys added since it was written at their defaults
    (config/model/blank_model.yaml: e.g. model.vision=false), and trust_remote_code ours."""
    model_cfg = OmegaConf.merge(OmegaConf.load(Path(__file__).parent / "config" / "model" / "blank_model.yaml"),
                                saved.model)
    model_cfg.trust_remote_code = trust_remote_code
    return model_cfg


def build_skeleton(model_cfg, tokenizer, trust_remote_code: bool):
    """The model's architecture on the meta device: no weights are allocated or loaded."""
    from_config = OmegaConf.to_container(model_cfg.from_config) if model_cfg.from_config else None
    with torch.device("meta"):
        if from_config is not None:
            return utils.build_model(None, from_config, tokenizer, torch.float32, vision=model_cfg.vision)
        config = utils.load_model_config(model_cfg.name_or_path, model_cfg.gguf_file, trust_remote_code)
        return utils.model_class(model_cfg.vision).from_config(config, trust_remote_code=trust_remote_code)


def export(checkpoint_dir: str, out_dir: str = None, trust_remote_code: bool = False,
           adapter_only: bool = False) -> Path:
    """Write the Hugging Face files of a checkpoint; returns the output directory."""
    checkpoint = find_checkpoint(checkpoint_dir)
    verify(checkpoint, checkpoint_dir)
    saved = OmegaConf.load(checkpoint / "config.yaml")
    if "lora" in saved and saved.lora.r is not None:
        return export_lora(checkpoint, saved, out_dir, adapter_only)
    # The saved config says which model this is; whether its code may run is only ours to say.
    model_cfg = saved_model_config(saved, trust_remote_code)
    if checkpoints.is_sharded(checkpoint):  # checkpoint_format=sharded: one file per process
        try:
            state = checkpoints.load_policy_state(checkpoint)
        except checkpoints.DamagedCheckpoint as e:
            raise utils.ConfigError(f"{OPTION}={checkpoint_dir}: {e}") from None
    else:
        state = utils.load_policy_archive(str(checkpoint / "policy.pt"), OPTION)
    import train
    tokenizer, processor = train.build_tokenizer(model_cfg)  # a VLM's processor is saved with it
    skeleton = build_skeleton(model_cfg, tokenizer, trust_remote_code)
    utils.check_state_dict(skeleton, state, f"{OPTION}={checkpoint_dir}")
    out = Path(out_dir) if out_dir else checkpoint
    out.mkdir(parents=True, exist_ok=True)
    utils.save_hf_format(skeleton, state, processor or tokenizer, out)
    return out


def export_lora(checkpoint: Path, saved, out_dir: Optional[str], adapter_only: bool) -> Path:
    """A LoRA checkpoint (policy.pt holds the adapter): its PEFT adapter directory (adapter_only),
    or the merged model, rebuilding the base weights the saved config names (checked against
    the hash recorded in base_weights.pt)."""
    import lora
    import ref_cache
    import train
    saved.model = saved_model_config(saved, False)  # a checkpoint never decides that code runs
    tokenizer, processor = train.build_tokenizer(saved.model)
    policy, _ = train.build_models(saved, tokenizer)
    adapter = utils.load_policy_archive(str(checkpoint / "policy.pt"), OPTION)
    utils.load_checked_state_dict(policy, {**policy.state_dict(), **adapter}, OPTION)
    out = Path(out_dir) if out_dir else checkpoint
    if adapter_only:
        lora.write_peft_adapter(out, policy.state_dict(), policy, saved.model.name_or_path)
        return out
    record = utils.safe_torch_load(str(checkpoint / "base_weights.pt"), OPTION)["state"]
    base = ref_cache.weights_hash(policy, lambda n: "lora_" not in n and ".modules_to_save." not in n)
    if base != record["hash"]:
        raise utils.ConfigError(f"{OPTION}={checkpoint}: rebuilding the base weights from its "
                                f"config.yaml ({record['sources']}) gives other weights than it was "
                                "trained on; pass --adapter to export the adapter alone")
    out.mkdir(parents=True, exist_ok=True)
    merged = lora.merged_state(policy.state_dict(), lora.lora_layout(policy))
    utils.save_hf_format(policy, merged, processor or tokenizer, out)
    return out


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", help="a step-N/ or LATEST/ directory, or a run directory")
    parser.add_argument("out_dir", nargs="?", default=None, help="default: the checkpoint itself")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model's own Python code (auto_map) run; only for code you trust")
    parser.add_argument("--adapter", action="store_true",
                        help="for a LoRA checkpoint: write the PEFT adapter instead of the merged model")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.trust_remote_code, args.adapter)
    except utils.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote Hugging Face files of {find_checkpoint(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
