"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) through peft: putting an adapter on a causal LM,
switching it off (the reference of references.AdapterReference), merging it into the base weights,
and writing it as a PEFT adapter directory.

The trainer gets the transformers model itself with peft's LoRA layers inside it (not the
PeftModel wrapper), so its backbone and output layer are found and called exactly as for full
fine-tuning (logps.py), and FSDP shards it like any model. peft is imported only here, and this
module only when lora.r is set.
"""
import contextlib
import copy
from pathlib import Path
from typing import Dict, List, Optional

import torch

from utils import ConfigError, save_safetensors

# The trained adapter's name inside the model (peft's default) and the frozen reference adapter's.
POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


def default_target_modules(model_type: str) -> List[str]:
    """peft's own per-family default (q_proj/v_proj for Llama and Mixtral, c_attn for GPT-2,
    query_key_value for GPT-NeoX), the same TRL and peft use when none is given."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known
    if model_type not in known:
        raise ConfigError(f"lora.target_modules=null: peft has no default for model_type "
                          f"{model_type}; name the projections, e.g. 'lora.target_modules=[q_proj,v_proj]'")
    return list(known[model_type])


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: Optional[List[str]],
               modules_to_save: Optional[List[str]], reference_adapter: Optional[str],
               copy_as_reference: bool):
    """Put a trainable LoRA adapter on `model` (its base weights frozen) and, optionally, a frozen
    second adapter to serve as the reference (TRL's "option 3").

    Args:
        model: a transformers causal LM (weights already final: archive loaded, merges done).
        r, alpha, dropout: the LoRA rank, scale numerator (scaling = alpha / r) and dropout.
        target_modules: module names to adapt, or a regex (None: peft's default for the model
            family).
        modules_to_save: modules trained in full and saved with the adapter (None: none).
        reference_adapter: a PEFT adapter directory loaded, frozen, as the reference.
        copy_as_reference: without reference_adapter, add a frozen copy of the freshly
            initialised adapter as the reference (TR-DPO then syncs it with the policy's).

    Returns:
        The same transformers model object, with LoRA layers inside it.
    """
    import peft
    # a str is a regex peft full-matches against module names (vision.language_model_targets)
    targets = (target_modules if isinstance(target_modules, str) else list(target_modules) if target_modules
               else default_target_modules(model.config.model_type))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=list(modules_to_save) if modules_to_save else None,
                             task_type="CAUSAL_LM")
    try:
        wrapper = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module the model does not have
        raise ConfigError(f"lora.target_modules={targets}: {e}") from None
    if reference_adapter is not None:
        check_adapter_dir(reference_adapter, "lora.reference_adapter")
        wrapper.load_adapter(reference_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    elif copy_as_reference:
        wrapper.add_adapter(REFERENCE_ADAPTER, config)
        copy_adapter(model, POLICY_ADAPTER, REFERENCE_ADAPTER)
    # loading or adding an adapter may change which one is active and trainable; fix both
    wrapper.base_model.set_adapter(POLICY_ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(is_policy_adapter_key(name))
    return model


def check_adapter_dir(path: str, option: str):
    if not (Path(path) / "adapter_config.json").is_file():
        raise ConfigError(f"{option}={path} is not a PEFT adapter directory (it has no "
                          "adapter_config.json); pass e.g. an earlier run's LATEST/adapter")


def merge_adapter(model, path: str):
    """`model` with the PEFT adapter at `path` merged into its weights (plain layers again)."""
    import peft
    check_adapter_dir(path, "lora.merge_archive")
    merged = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    return merged


def is_policy_adapter_key(name: str) -> bool:
    """Whether a state-dict key or parameter name belongs to the trained adapter."""
    return (f".{POLICY_ADAPTER}." in name or name.endswith(f".{POLICY_ADAPTER}")) and (
        "lora_" in name or ".modules_to_save." in name)


def is_adapter_key(name: str, adapter: str) -> bool:
    return f".{adapter}." in name and ("lora_" in name or ".modules_to_save." in name)


def copy_adapter(model, source: str, target: str):
    """Copy adapter `source`'s weights over adapter `target`'s (same config)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if is_adapter_key(name, source):
                params[name.replace(f".{source}.", f".{target}.")].copy_(param)


def adapter_layers(model):
    """peft's LoRA layers and modules_to_save wrappers of a model (they hold the switches)."""
    return [m for m in model.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "_active_adapter")]


@contextlib.contextmanager
def active_adapter(model, name: Optional[str]):
    """Run the model with adapter `name` only (None: every adapter off, the base model), then
    switch back. Unlike peft's disable_adapter()/set_adapter(), this never touches requires_grad,
    so it is safe mid-step and on sharded parameters."""
    layers = adapter_layers(model)
    saved = [(m._disable_adapters, m._active_adapter) for m in layers]
    for m in layers:
        if name is None:
            m._disable_adapters = True
        else:
            m._active_adapter = [name]
    try:
        yield
    finally:
        for m, (disabled, active) in zip(layers, saved):
            m._disable_adapters, m._active_adapter = disabled, active


def lora_layout(model) -> Dict[str, tuple]:
    """{module name: (scaling, fan_in_fan_out)} of the policy adapter's LoRA layers."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and POLICY_ADAPTER in scaling:
            out[name] = (scaling[POLICY_ADAPTER], bool(getattr(module, "fan_in_fan_out", False)))
    return out


def merged_state(state: Dict[str, torch.Tensor], layout: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """A LoRA model's full state dict in the plain model's layout with the policy adapter merged:
    W = W_base + scaling * B @ A (transposed for GPT-2's Conv1D, fan_in_fan_out), a module in
    modules_to_save replaced by its trained copy, other adapters dropped.

    Args:
        state: full state dict of the model with LoRA layers (keys like
            'model.layers.0.self_attn.q_proj.base_layer.weight', '...lora_A.default.weight').
        layout: lora_layout(model).
    """
    out = {}
    for key, value in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            if f".modules_to_save.{POLICY_ADAPTER}." in key:
                out[key.replace(f".modules_to_save.{POLICY_ADAPTER}.", ".")] = value
            continue
        out[key.replace(".base_layer.", ".")] = value
    for module, (scaling, fan_in_fan_out) in layout.items():
        a = state[f"{module}.lora_A.{POLICY_ADAPTER}.weight"]
        b = state[f"{module}.lora_B.{POLICY_ADAPTER}.weight"]
        delta = (b.float() @ a.float()) * scaling
        if fan_in_fan_out:
            delta = delta.T
        weight = out[f"{module}.weight"]
        out[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out


def peft_adapter_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The policy adapter's tensors under the names PEFT saves them with
    ('base_model.model.<module>.lora_A.weight', 'base_model.model.<module>.weight' for a module in
    modules_to_save)."""
    out = {}
    for key, value in state.items():
        if not is_policy_adapter_key(key):
            continue
        name = key.replace(f".modules_to_save.{POLICY_ADAPTER}.", ".").replace(f".{POLICY_ADAPTER}.", ".")
        out[f"base_model.model.{name}"] = value.detach().cpu().contiguous()
    return out


def write_peft_adapter(directory: Path, state: Dict[str, torch.Tensor], model,
                       base_model_name_or_path: Optional[str]):
    """Write adapter_config.json and adapter_model.safetensors: a directory that
    peft.PeftModel.from_pretrained(base_model, directory) loads.

    Args:
        directory: where to write (created).
        state: the LoRA model's state dict (at least the policy adapter's tensors).
        model: the LoRA model (its peft_config).
        base_model_name_or_path: recorded in the config, as peft does.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[POLICY_ADAPTER])
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True
    config.save_pretrained(str(directory))  # peft's own adapter_config.json
    save_safetensors(peft_adapter_state(state), directory / "adapter_model.safetensors")
