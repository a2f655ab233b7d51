"""precompute_ref_log_probs' file on disk: the reference scores every sequence once; the
log-probs are kept (reused by any run with the same reference weights and the same tokenised
sequences) and looked up by a hash of each sequence (references.CachedReference reads them).
"""
import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, List

import torch

import parallel
import vision
from utils import default_cache_dir, rank0_print

# 2: with LD-DPO's public sums per pair
REFERENCE_CACHE_VERSION = 2


def pair_keys(batch: Dict, sides) -> List[bytes]:
    """16-byte hash per (chosen, rejected) row pair; none for a batch of one side (SFT)."""
    if tuple(sides) != ("chosen", "rejected"):
        return []
    return [hashlib.blake2b(c + r, digest_size=16).digest()
            for c, r in zip(sequence_keys(batch, "chosen"), sequence_keys(batch, "rejected"))]


def reference_cache_dir() -> Path:
    return default_cache_dir() / "ref-logps"


def sequence_keys(batch: Dict, side: str) -> List[bytes]:
    """16-byte hash per row of a side's token ids and labels, padding excluded (a sequence gets
    the same key however its batch was padded), and of its images (vision.py) when it has any:
    the same text with other images is another sequence."""
    ids, mask, labels = (batch[f"{side}_{k}"].detach().cpu()
                         for k in ("input_ids", "attention_mask", "labels"))
    images = batch.get("image_inputs") or [{}] * len(ids)
    keys = []
    for row_ids, row_mask, row_labels, row_images in zip(ids, mask.bool(), labels, images):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(row_ids[row_mask].to(torch.int32).numpy().tobytes())
        digest.update(row_labels[row_mask].to(torch.int32).numpy().tobytes())
        digest.update(vision.digest(row_images))
        keys.append(digest.digest())
    return keys


def reference_cache_path(fingerprint: str, keys) -> Path:
    """The cache file for these reference weights and exactly this set of sequences."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"v{REFERENCE_CACHE_VERSION}|{fingerprint}|".encode())
    for key in sorted(keys):
        digest.update(key)
    return reference_cache_dir() / f"ref-logps-{digest.hexdigest()}.pt"


def _key_tensor(keys: List[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(-1, 16) \
        if keys else torch.zeros(0, 16, dtype=torch.uint8)


def save_reference_cache(path: Path, entries: Dict[bytes, tuple], publics: Dict[bytes, tuple],
                         dtype: torch.dtype):
    keys, pairs = sorted(entries), sorted(publics)
    data = {"version": REFERENCE_CACHE_VERSION, "keys": _key_tensor(keys),
            "sum": torch.tensor([entries[k][0] for k in keys], dtype=dtype),
            "mean": torch.tensor([entries[k][1] for k in keys], dtype=dtype),
            "pairs": _key_tensor(pairs),
            "public": torch.tensor([publics[k] for k in pairs], dtype=dtype).reshape(-1, 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)  # readers never see a half-written file


def load_reference_cache(path: Path):
    """({sequence key: (sum, mean)}, {pair key: (public, public)}, dtype), or None when the file
    is missing or unreadable."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") != REFERENCE_CACHE_VERSION:
            return None
        keys = [bytes(row) for row in data["keys"].numpy()]
        entries = dict(zip(keys, zip(data["sum"].tolist(), data["mean"].tolist())))
        pairs = [bytes(row) for row in data["pairs"].numpy()]
        publics = dict(zip(pairs, map(tuple, data["public"].tolist())))
        return entries, publics, data["sum"].dtype
    except FileNotFoundError:
        return None
    except Exception as e:  # damaged: computed again and rewritten
        rank0_print(f"precompute_ref_log_probs: ignoring unreadable cache {path} "
                    f"({type(e).__name__}: {e})")
        return None


def weights_hash(model, keep: Callable[[str], bool] = lambda name: True) -> str:
    """Hash of the model config and every kept parameter's name, dtype, shape and bytes: the
    reference cache's key for a model's weights, and a LoRA base's record (every rank must call:
    sharded parameters are gathered one at a time)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, param in model.named_parameters():
        if keep(name):
            tensor = parallel.full_tensor(param).contiguous().reshape(-1)
            digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()
