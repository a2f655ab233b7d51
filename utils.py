"""Helpers shared by train.py and trainers.py: run directories, seeding, tokenizers, models,
safe checkpoint loading and the few distributed primitives the trainers need."""
import datetime
import getpass
import hashlib
import json
import os
import pickle
import random
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist


class ConfigError(ValueError):
    """A bad setting or input: train.py prints its message as one line and exits non-zero."""


# ----------------------------------------------------------------------------- run directories

def get_local_dir(prefixes: List[str]) -> str:
    """The first of `prefixes` that exists or can be created, with a per-user folder below it."""
    for prefix in prefixes:
        try:
            path = Path(prefix) / getpass.getuser()
            path.mkdir(parents=True, exist_ok=True)
            return str(path)
        except OSError:
            continue
    raise ConfigError(f"local_dirs: none of {list(prefixes)} exists or can be created; "
                      "pass local_dirs=[SOME/WRITABLE/DIR] or local_run_dir=PATH")


def get_local_run_dir(exp_name: str, local_dirs: List[str]) -> str:
    """A fresh run directory name: {local_dir}/{exp_name}_{timestamp} (not created here)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return str(Path(get_local_dir(local_dirs)) / f"{exp_name}_{stamp}")


def rank0_print(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def set_seed(seed: int):
    """Seed Python, NumPy and torch; the data order is seeded separately from the same value."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """RNG states in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- dtypes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def get_dtype(key: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{key}={name} is not a dtype; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- tokenizers

EMBEDDED_TOKENIZER = "embedded"
EMBEDDED_VOCAB_SIZE = 1024
# An HH-style chat template for the embedded tokenizer, so conversational data renders the way the
# HH prompts the tiny model was trained on look.
EMBEDDED_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}")


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dpo-framework"


def build_embedded_tokenizer(cache_dir: Optional[str] = None):
    """A byte-level BPE tokenizer trained on the synthetic dataset, cached after the first build.

    Training is deterministic, so every machine builds the same tokenizer; the cache key hashes the
    corpus and the settings.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    import preference_datasets

    corpus = preference_datasets.synthetic_corpus()
    key = hashlib.sha256(("\n".join(corpus) + f"|{EMBEDDED_VOCAB_SIZE}|v1").encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"embedded-tokenizer-{key}"
    if not (path / "tokenizer.json").exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus, vocab_size=EMBEDDED_VOCAB_SIZE, min_frequency=2,
                                special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                      bos_token="<|endoftext|>", pad_token="<|pad|>",
                                      chat_template=EMBEDDED_CHAT_TEMPLATE)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; its copy is identical
            pass
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def build_tokenizer(name_or_path: str, trust_remote_code: bool = False, cache_dir=None):
    """The embedded tokenizer, or one from the hub / a local directory. Adds a pad token if missing
    (the EOS token, as the DPO repository does)."""
    if name_or_path == EMBEDDED_TOKENIZER:
        tokenizer = build_embedded_tokenizer()
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir,
                                                  trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


# ----------------------------------------------------------------------------- models

def build_model(name_or_path: Optional[str], from_config: Optional[dict], tokenizer, dtype,
                trust_remote_code: bool = False, cache_dir=None):
    """A causal LM: randomly initialised from `from_config` (a transformers config dict with
    model_type) or loaded from `name_or_path`. Initialisation is seeded by the caller."""
    import transformers
    if from_config is not None:
        settings = dict(from_config)
        model_type = settings.pop("model_type")
        settings["vocab_size"] = max(int(settings.get("vocab_size", 0)), len(tokenizer))
        settings.setdefault("pad_token_id", tokenizer.pad_token_id)
        settings.setdefault("eos_token_id", tokenizer.eos_token_id)
        settings.setdefault("bos_token_id", tokenizer.bos_token_id)
        config = transformers.AutoConfig.for_model(model_type, **settings)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name_or_path, cache_dir=cache_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    return model


def disable_dropout(model: torch.nn.Module):
    """Dropout makes the policy and reference log-probs disagree at identical weights (DPO repo)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ----------------------------------------------------------------------------- safe loading

def safe_torch_load(path: str, what: str = "checkpoint"):
    """torch.load with weights_only=True; a file that needs arbitrary unpickling is refused with a
    message naming it, and nothing from it runs."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{what} file {path} needs arbitrary code to unpickle and was refused "
                          f"(only tensors and plain containers load): {str(e).splitlines()[0]}")
    except Exception as e:  # truncated or not a torch file at all
        raise ConfigError(f"{what} file {path} could not be read as a torch checkpoint: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def load_policy_archive(path: str) -> Dict[str, torch.Tensor]:
    """The model state dict of a policy.pt written by this framework (or the DPO repository)."""
    archive = safe_torch_load(path, "model.archive")
    state = archive.get("state") if isinstance(archive, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"model.archive file {path} is not a policy.pt from this framework "
                          "(expected a dict with a 'state' model state dict)")
    return state


# ----------------------------------------------------------------------------- distributed

def init_distributed(rank: int, world_size: int, local_rank: int, timeout_minutes: float = 30):
    """Join torchrun's process group: NCCL on GPUs, gloo on CPU, with a timeout so a failed rank
    cannot hang the others forever."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_cat(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor across ranks (identity without a process group). Ranks may hold
    different lengths."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    values = values.detach().reshape(-1)
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[:values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)])


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def save_hf_format(model, state_dict: Dict[str, torch.Tensor], tokenizer, out_dir):
    """config.json + safetensors weights + tokenizer, loadable with from_pretrained anywhere."""
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    from safetensors.torch import save_file
    # Tied weights share storage; safetensors refuses shared tensors, so store distinct copies of
    # what the model does not tie on load.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tensors = {k: v.contiguous().clone() for k, v in state_dict.items()
               if not (k in tied and model.config.tie_word_embeddings)}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
