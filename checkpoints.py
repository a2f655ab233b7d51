"""Checkpoints on disk: writing one atomically, finding the newest intact one, reading it back,
pruning old ones and cleaning up after a crash.

A checkpoint is a directory {run_dir}/step-{examples}/ or {run_dir}/LATEST/ (the end of the run)
holding one file per named state (policy.pt, optimizer.pt, scheduler.pt, ...; each a dict
{"step_idx", "state", "metrics"}), whatever extra files the caller writes (config.yaml, the Hugging
Face export of LATEST), trainer_state.pt, whose presence marks the checkpoint complete and which
records the size of every other file (so a file truncated or deleted afterwards is found without
reading it), and manifest.json, written last: the size and content hash of every file, checked
before a file is trusted (verify_files), so a file damaged in place is found too. It is written
under a temporary name and renamed into place, so a crash never leaves a half checkpoint under
the final name. Nothing here knows about trainers:
callers pass the state dicts and a function that writes their extra files; the functions that
save, read and resume on every rank of a run take its `parallel.Ranks` (rank, barrier).
"""
import errno
import functools
import json
import mmap
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import xxhash
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

import parallel
import utils
from utils import (ConfigError, broadcast_object, check_state_dict, get_rng_state, rank0_print,
                   safe_torch_load, set_rng_state)

# Written last; the checkpoint counts as complete once it exists.
TRAINER_STATE = "trainer_state.pt"
# The states every checkpoint holds, in the order they are written (a trainer may add more, e.g.
# a reference's), and with trainer_state.pt the files that make a checkpoint complete.
STATE_FILES = ("policy.pt", "optimizer.pt", "scheduler.pt")
CHECKPOINT_FILES = STATE_FILES + (TRAINER_STATE,)
# Written after trainer_state.pt: {"hash": HASH, "files": {path: {"size": bytes, HASH: hex}}}.
MANIFEST = "manifest.json"
# XXH3-128 (xxHash, a dependency of `datasets`): ~10 GB/s on one core against ~1 GB/s for
# sha256/blake2b, so hashing adds a few percent to a save. It finds damage (bit rot, a torn
# copy), not tampering: whoever can rewrite a file can rewrite the manifest too.
HASH = "xxh3_128"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the partial write was removed
    and the previous checkpoints are untouched. The message is one line for the user."""


class DamagedCheckpoint(ConfigError):
    """A checkpoint's files are missing, truncated or unreadable."""


# ----------------------------------------------------------------------------- finding

def checkpoint_dirs(run_dir: Path) -> List[Path]:
    """LATEST/ and every step-N/ directory of a run (complete or not)."""
    return [p for p in run_dir.glob("*")
            if p.is_dir() and (p.name == "LATEST" or p.name.startswith("step-"))]


def inspect_checkpoint(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(trainer state, None) for an intact checkpoint, else (None, what is wrong with it).

    Intact means: trainer_state.pt reads back, every file it lists has the size it had when
    written (checkpoints written before sizes were recorded: every file in CHECKPOINT_FILES
    exists), and the manifest exists if the checkpoint was written with one. Contents are
    hashed only before the checkpoint is loaded (verify_files)."""
    if not (path / TRAINER_STATE).is_file():
        return None, f"{TRAINER_STATE} is missing (the save did not finish)"
    try:
        state = safe_torch_load(str(path / TRAINER_STATE), "checkpoint")
    except ConfigError as e:
        return None, str(e)
    sizes = state.get("files") if isinstance(state, dict) else None
    if not isinstance(sizes, dict):
        sizes = {name: None for name in STATE_FILES}
    if state.get("manifest") and not (path / MANIFEST).is_file():
        return None, f"{MANIFEST} is missing"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return None, f"{name} is missing"
        actual = file.stat().st_size
        if size is not None and actual != size:
            return None, f"{name} has {actual:,} bytes of the {size:,} written"
    return state, None


def survey(run_dir: Path) -> Tuple[List[Tuple[Path, dict]], List[Tuple[Path, str]]]:
    """(intact checkpoints with their trainer states, newest first: the most examples seen,
    LATEST first on ties; damaged checkpoints with what is wrong, in no particular order)."""
    intact, damaged = [], []
    for path in checkpoint_dirs(run_dir):
        state, problem = inspect_checkpoint(path)
        if problem is None:
            intact.append((path, state))
        else:
            damaged.append((path, problem))
    intact.sort(key=lambda item: (item[1]["example_counter"], item[0].name == "LATEST"),
                reverse=True)
    return intact, damaged


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and inspect_checkpoint(path)[1] is None


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The intact checkpoint with the most examples seen (LATEST wins ties), or None."""
    intact, _ = survey(run_dir)
    return intact[0][0] if intact else None


def resume_candidates(resume_from: Optional[str], run_dir: Path) -> List[Path]:
    """The checkpoints to try to resume from, best first: `resume_from` alone when given (it must
    be intact), else the run directory's intact checkpoints, newest first; [] to start afresh.

    Raises:
        DamagedCheckpoint: resume_from is damaged, or the run directory has checkpoints but none
            intact (one line naming resume_from, the way to start from elsewhere).
    """
    if resume_from:
        path = Path(resume_from)
        problem = inspect_checkpoint(path)[1] if path.is_dir() else "not a directory"
        if problem is not None:
            raise DamagedCheckpoint(f"resume_from={path} is not an intact checkpoint: {problem}; "
                                    "pass a step-N/ or LATEST/ directory written by train.py")
        return [path]
    if not run_dir.is_dir():
        return []
    intact, damaged = survey(run_dir)
    if damaged and not intact:
        raise no_intact_checkpoint(run_dir, damaged)
    return [path for path, _ in intact]


def no_intact_checkpoint(run_dir: Path, damaged: List[Tuple[Path, str]]) -> DamagedCheckpoint:
    listed = "; ".join(f"{p.name}: {problem}" for p, problem in sorted(damaged))
    return DamagedCheckpoint(
        f"no intact checkpoint to resume in {run_dir} ({listed}); pass resume_from=PATH of an "
        "intact step-N/ or LATEST/ with a new local_run_dir, or start over in a new local_run_dir")


def how_to_continue(run_dir: Path, fix: str) -> str:
    """Advice after training diverged: relaunching the run would diverge again, and lr & co. may
    not change within it, so it names the checkpoint to continue from in a new run directory (the
    newest complete one), if there is one, and the `fix` to apply first."""
    good = newest_verified(run_dir)
    if good is None:
        return f"no intact checkpoint was saved before it; {fix} and start again"
    return (f"the last good checkpoint is {good}; {fix} and continue from it with "
            f"resume_from={good} local_run_dir=NEW_DIR")


def newest_verified(run_dir: Path) -> Optional[Path]:
    """The newest intact checkpoint whose files match its manifest (or that has none), or None."""
    for path, _ in survey(run_dir)[0] if run_dir.is_dir() else []:
        try:
            verify_files(path)
            return path
        except DamagedCheckpoint:
            continue
    return None


def resume_checkpoint(resume_from: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from (see resume_candidates), or None to start from scratch."""
    candidates = resume_candidates(resume_from, run_dir)
    return candidates[0] if candidates else None


def damaged_newer_than(run_dir: Path, example_counter: Optional[int]) -> List[Tuple[Path, str]]:
    """Damaged checkpoints that would have been resumed instead of one at `example_counter`
    (None: of none): LATEST, and step-N with N larger."""
    def newer(path: Path) -> bool:
        if example_counter is None or path.name == "LATEST":
            return True
        step = path.name.split("-", 1)[1]
        return step.isdigit() and int(step) > example_counter
    return sorted((p, problem) for p, problem in survey(run_dir)[1] if newer(p))


# ----------------------------------------------------------------------------- writing

def atomic_replace_dir(tmp: Path, final: Path):
    """Move a fully written directory into place so a crash never leaves a half checkpoint under
    the final name."""
    if final.exists() or final.is_symlink():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        remove(trash)
    else:
        os.replace(tmp, final)


class HashingWriter:
    """A binary file that hashes the bytes written through it: torch.save streams into it, so
    the content hash costs no second read of the file."""

    def __init__(self, file):
        self.file, self.hash = file, xxhash.xxh3_128()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    @property
    def name(self) -> str:  # the path, as a file object's
        return self.file.name


def remove(path: Path):
    """Delete a directory tree, or a file or symbolic link as itself (rmtree refuses links; the
    directory a link points to is not the run's to delete)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def save_file(obj, path: Path) -> str:
    """torch.save through a Python file object, so that a full disk's OSError(ENOSPC) is in the
    exception's chain (see is_out_of_space). Returns the file's content hash (HASH)."""
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
    return writer.hash.hexdigest()


def hash_file(path: Path) -> str:
    """The content hash (HASH) of a file, hashed where it lies in the page cache (mapped: a
    third of the time of reading it into a buffer)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # an empty file cannot be mapped
            return xxhash.xxh3_128().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_128(mapped).hexdigest()


def write_manifest(directory: Path, hashes: Dict[str, str]):
    """directory/MANIFEST: the size and content hash of every file under `directory`; `hashes`
    gives those already known (hashed as they were written), the others are read back."""
    files = {name: {"size": size, HASH: hashes.get(name) or hash_file(directory / name)}
             for name, size in file_sizes(directory).items() if name != MANIFEST}
    with open(directory / MANIFEST, "w") as f:
        json.dump({"hash": HASH, "files": files}, f, indent=0)


def is_out_of_space(error: BaseException) -> bool:
    """Whether a full disk (or quota) caused `error`, anywhere in its chain: torch.save's zip
    writer raises its own "unexpected pos" RuntimeError with the OSError(ENOSPC) only as its
    __context__, and other writers (safetensors) wrap the OS error in theirs, keeping its text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def file_sizes(directory: Path) -> Dict[str, int]:
    """{path relative to directory: size in bytes} of every file under it."""
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file()}


def temporary_dir(run_dir: Path, name: str) -> Path:
    """Where {run_dir}/{name}/ is written before it is renamed into place (the same on every
    rank; the run directory's lock keeps other runs out)."""
    return run_dir / f".tmp-{name}"


def write_checkpoint(run_dir: Path, name: str, states: Dict[str, object], step: int,
                     metrics: Dict[str, float], trainer_state: dict,
                     write_extras: Optional[Callable[[Path], None]] = None,
                     started: bool = False) -> Path:
    """Write {run_dir}/{name}/ atomically (call on one rank only).

    Args:
        run_dir: the run directory.
        name: 'LATEST' or 'step-{examples}'.
        states: {file name: state}, e.g. {"policy.pt": policy state dict, ...}, each saved as
            {"step_idx": step, "state": state, "metrics": metrics}, in this order.
        step: examples seen.
        metrics: the evaluation metrics at this point.
        trainer_state: what resuming needs besides the states (counters, RNG, ...); written
            with "files" (each other file's size), "state_files" (the names in `states`) and
            "manifest" (that MANIFEST, written last, holds every file's content hash).
        write_extras: called with the temporary directory to add files (config, exports).
        started: the temporary directory exists already, holding files every rank wrote
            (checkpoint_format=sharded; see save_sharded).

    Returns:
        The checkpoint's final path.
    Raises:
        CheckpointWriteError: the disk (or quota) is full. On any error the partial write is
            removed and the previous checkpoint under `name`, if any, is left as it was.
    """
    final, tmp = run_dir / name, temporary_dir(run_dir, name)
    try:
        if not started:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        hashes = {fname: save_file({"step_idx": step, "state": state, "metrics": metrics},
                                   tmp / fname)
                  for fname, state in states.items()}
        if write_extras is not None:
            write_extras(tmp)
        hashes[TRAINER_STATE] = save_file(dict(trainer_state, files=file_sizes(tmp),
                                               state_files=list(states), manifest=MANIFEST),
                                          tmp / TRAINER_STATE)
        write_manifest(tmp, hashes)
        atomic_replace_dir(tmp, final)
    except BaseException as e:  # KeyboardInterrupt too: never leave the partial write behind
        abandon_write(run_dir, name, e)
    return final


def abandon_write(run_dir: Path, name: str, error: BaseException):
    """Remove the partial write of {run_dir}/{name}/ and raise: CheckpointWriteError (one line)
    when the disk or quota is full, else `error` itself."""
    shutil.rmtree(temporary_dir(run_dir, name), ignore_errors=True)
    if is_out_of_space(error):
        raise out_of_space(run_dir, name) from None
    raise error


def out_of_space(run_dir: Path, name: str) -> CheckpointWriteError:
    return CheckpointWriteError(f"no space left writing {name} to {run_dir}; free space or set "
                                "keep_checkpoints")


# ----------------------------------------------------------------------------- verifying

def resume_files(listed) -> List[str]:
    """What resuming reads of a checkpoint's files: its torch files and shards (not the
    config, nor LATEST's Hugging Face files, which export_hf.py may rewrite in place)."""
    return [n for n in listed if n.endswith(".pt") or n.startswith(SHARDED_DIR + "/")]


def read_manifest(path: Path) -> Optional[dict]:
    """{file: {"size", HASH}} from a checkpoint's MANIFEST, or None when it has none."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if manifest["hash"] != HASH or not all(HASH in entry for entry in files.values()):
            raise ValueError(f"not a {HASH} manifest")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"{file} could not be read ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return files


def verify_files(path: Path, names: Optional[List[str]] = None) -> bool:
    """Check files of checkpoint `path` against the content hashes its manifest recorded when it
    was written, before anything trusts them.

    Args:
        path: the checkpoint directory.
        names: the files to check, relative to `path`; a folder (SHARDED_DIR) stands for every
            file under it; None: every file resuming reads (resume_files).
    Returns:
        True when every file matched; False for a checkpoint written without a manifest (before
        content hashes), after one line saying it cannot be verified.
    Raises:
        DamagedCheckpoint: naming the first file that is missing or differs, or the manifest.
    """
    listed = read_manifest(path)
    if listed is None:
        rank0_print(f"note: {path} was written without {MANIFEST} (before checkpoints held "
                    "content hashes); its files cannot be verified")
        return False
    wanted = resume_files(listed) if names is None else [
        n for name in names for n in ([k for k in listed if k.startswith(name + "/")] or [name])]
    for name in wanted:
        file, entry = path / name, listed.get(name)
        if entry is None:
            raise DamagedCheckpoint(f"{file} is not listed in {path / MANIFEST}")
        if not file.is_file():
            raise DamagedCheckpoint(f"{file} is missing")
        if file.stat().st_size != entry["size"] or hash_file(file) != entry[HASH]:
            raise DamagedCheckpoint(f"{file} does not match the content hash recorded when it "
                                    "was written (it was damaged after the save)")
    return True


def load_policy_archive(path: str, option: str = "model.archive") -> Dict[str, torch.Tensor]:
    """utils.load_policy_archive (`path`: a policy.pt, a checkpoint or a run directory), after
    checking the file against its checkpoint's manifest (a lone policy.pt cannot be verified)."""
    file = Path(utils.resolve_policy_file(path, option))
    try:
        verify_files(file.parent, [file.name])
    except DamagedCheckpoint as e:
        raise DamagedCheckpoint(f"{option}={path}: {e}") from None
    return utils.load_policy_archive(str(file), option)


# ----------------------------------------------------------------------------- reading

def read_checkpoint(path: Path, names=STATE_FILES, extra_states: bool = True) -> tuple:
    """({file name: state} for each of `names` and for any other state file the checkpoint was
    written with (e.g. a reference's), trainer state) of a checkpoint written by
    `write_checkpoint`; files are loaded with weights_only (utils.safe_torch_load).

    Raises:
        DamagedCheckpoint: a file is missing, truncated or not a torch file.
    """
    try:
        trainer_state = safe_torch_load(str(path / TRAINER_STATE), "resume checkpoint")
        extra = trainer_state.get("state_files", ()) if extra_states else ()
        names = list(names) + [n for n in extra if n not in names and n not in STATE_FILES]
        states = {name: safe_torch_load(str(path / name), "resume checkpoint")["state"]
                  for name in names}
    except DamagedCheckpoint:
        raise
    except ConfigError as e:
        raise DamagedCheckpoint(str(e)) from None
    except (KeyError, TypeError, AttributeError) as e:  # a torch file of another shape
        raise DamagedCheckpoint(f"checkpoint {path} is not one written by train.py "
                                f"({type(e).__name__}: {e})") from None
    return states, trainer_state


# ----------------------------------------------------------------------------- sharded format
# checkpoint_format=sharded: the policy and optimizer states are written by every process, each
# its own shard, with torch.distributed.checkpoint (DCP) into {checkpoint}/sharded/ (a .metadata
# file and one __{rank}_0.distcp file per process); the rest of the checkpoint is as above.

SHARDED_DIR = "sharded"


def is_sharded(path: Path) -> bool:
    return (path / SHARDED_DIR / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle that torch reads with plain pickle.load, so a checkpoint handed
    to you could run code through it. Only DCP's own metadata classes, torch dtypes, sizes and
    layouts are allowed here; anything else is refused before DCP reads the file."""

    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type):  # DCP's dataclasses and enums, never a function
                return found
        if (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                              ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath")}:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def check_sharded_metadata(path: Path):
    """Refuse (DamagedCheckpoint, one line) a sharded checkpoint whose metadata is unreadable or
    names anything but DCP's metadata classes."""
    file = path / SHARDED_DIR / ".metadata"
    try:
        with open(file, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:
        raise DamagedCheckpoint(f"checkpoint metadata {file} was refused: "
                                f"{type(e).__name__}: {e}") from None


def save_sharded(run_dir: Path, name: str, states: Dict[str, object], rank: int, barrier):
    """Every rank: write its shard of `states` ({"policy": model state dict, "optimizer": ...},
    as torch.distributed.checkpoint.state_dict returns them) into the temporary directory of
    {run_dir}/{name}/ (rank 0 creates it); rank 0 then finishes it with write_checkpoint(...,
    started=True). Raises as write_checkpoint does, on every rank (DCP gathers the failures)."""
    import torch.distributed.checkpoint as dcp
    tmp = temporary_dir(run_dir, name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        dcp.save(states, checkpoint_id=str(tmp / SHARDED_DIR))
    except BaseException as e:
        if rank == 0:
            abandon_write(run_dir, name, e)
        if is_out_of_space(e):
            raise out_of_space(run_dir, name) from None
        raise


def sharded_policy_shapes(path: Path) -> Dict[str, torch.Tensor]:
    """{name: meta-device tensor of the saved shape} of a sharded checkpoint's policy, to check
    against the model (utils.check_state_dict) before anything is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    check_sharded_metadata(path)
    metadata = dcp.FileSystemReader(str(path / SHARDED_DIR)).read_metadata()
    return {key[len("policy."):]: torch.empty(meta.size, dtype=meta.properties.dtype,
                                              device="meta")
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("policy.") and isinstance(meta, TensorStorageMetadata)}


def load_sharded(path: Path, states: Dict[str, object], ranks):
    """Every rank: fill `states` (shaped as for save_sharded, this rank's shards) in place from
    path/sharded/ (any number of processes may have written it).

    Raises:
        DamagedCheckpoint: on every rank, when a shard could not be read on any (`states` may
            then be partly filled: load another checkpoint into them, or none).
    """
    import torch.distributed.checkpoint as dcp
    problem = None
    try:
        check_sharded_metadata(path)
        dcp.load(states, checkpoint_id=str(path / SHARDED_DIR))
    except DamagedCheckpoint as e:
        problem = str(e)
    except (Exception, CheckpointException) as e:  # a damaged shard: unpickling, zip, ...
        problem = f"its shards in {path / SHARDED_DIR} could not be read ({shard_error(e)})"
    problems = ranks.merge({ranks.rank: problem} if problem else {})  # every rank agrees
    if problems:
        raise DamagedCheckpoint(problems[min(problems)])


def shard_error(error: BaseException) -> str:
    """One line for a failed DCP load: the first failing rank's own error, not the tracebacks
    of every rank that CheckpointException's text holds."""
    failures = getattr(error, "failures", None)
    where = ""
    if failures:
        rank = min(failures)
        error, where = failures[rank][0], f"rank {rank}: "
    text = str(error).strip().splitlines()
    return f"{where}{type(error).__name__}{': ' + text[0] if text else ''}"


def load_policy_state(path: Path) -> Dict[str, torch.Tensor]:
    """The policy's full state dict from a checkpoint of either format, in one process (export).

    Raises:
        DamagedCheckpoint: a file is missing or unreadable.
    """
    path = Path(path)
    if not is_sharded(path):
        try:
            return safe_torch_load(str(path / "policy.pt"), "checkpoint")["state"]
        except ConfigError as e:
            raise DamagedCheckpoint(str(e)) from None
    import torch.distributed.checkpoint as dcp
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in sharded_policy_shapes(path).items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load({"policy": state}, checkpoint_id=str(path / SHARDED_DIR), no_dist=True)
    except (Exception, CheckpointException) as e:  # a damaged shard, written without a manifest
        raise DamagedCheckpoint(f"the shards in {path / SHARDED_DIR} could not be read "
                                f"({shard_error(e)})") from None
    return state


def rng_state_for_rank(saved, rank: int) -> dict:
    """This rank's RNG state from a checkpoint's "rng": a list indexed by rank (one state per
    process, each holding its own device's CUDA state), or one dict (older checkpoints). A run
    resumed with more processes than it was saved with gives the extra ranks rank 0's state."""
    if isinstance(saved, dict):
        return saved
    return saved[rank] if rank < len(saved) else saved[0]


# ----------------------------------------------------------------------------- cleaning up

def prune_checkpoints(run_dir: Path, keep: Optional[int]):
    """Delete all but the newest `keep` step-* checkpoints (keep=None keeps them all)."""
    if keep is None:
        return
    steps = sorted((p for p in run_dir.glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:max(len(steps) - keep, 0)]:
        remove(old)


def remove_partial_writes(run_dir: Path):
    """Delete directories a crash during a save left behind."""
    for stale in list(run_dir.glob(".tmp-*")) + list(run_dir.glob(".old-*")):
        remove(stale)


# ----------------------------------------------------------------------------- a run, every rank
# What a trainer calls on every rank to save, restore and resume; `ranks` is its parallel.Ranks.

@dataclass
class TrainingParts:
    """What a checkpoint holds of a training run besides the trainer's own counters, and the
    trainer's hooks that read and load the policy and optimizer states in the plain model's layout
    (gathering them from, or sending them to, the shards of a sharded policy).

    Attributes:
        policy, optimizer, scheduler: the run's placed policy, its optimizer and LR schedule.
        reference: the run's references.Reference: it says what of the policy is kept (LoRA: the
            adapter only) and keeps states of its own.
        policy_state, optimizer_state: () -> the full state dict (called on every rank).
        load_policy, load_optimizer: load a full state dict (called on every rank; ranks other
            than 0 get {}).
    """
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    reference: object
    policy_state: Callable[[], Dict[str, torch.Tensor]]
    optimizer_state: Callable[[], dict]
    load_policy: Callable[[dict], None]
    load_optimizer: Callable[[dict], None]


def save_training(run_dir: Path, name: str, parts: TrainingParts, ranks, step: int,
                  metrics: Dict[str, float], trainer_state: Callable[[List[dict]], dict],
                  write_extras: Callable[..., None], keep: Optional[int], sharded: bool,
                  finished: bool) -> Path:
    """Write {run_dir}/{name}/ atomically, on every rank: policy, optimizer, scheduler, the
    reference's states and the trainer state (save_on_rank0 writes and prunes).

    Args:
        run_dir, name, step, metrics, keep: as save_on_rank0.
        parts: what is saved.
        ranks: this process among the ranks.
        trainer_state: (every rank's RNG state, indexed by rank) -> the trainer state to write.
        write_extras: (temporary directory, policy_state=the full policy state or None) -> None.
        sharded: checkpoint_format=sharded: every rank writes its own shards of policy and
            optimizer, nothing is gathered (save_sharded).
        finished: the run's last checkpoint (sharded checkpoints gather the whole policy for its
            exports only).
    Raises:
        CheckpointWriteError: as save_on_rank0.
    """
    rng = ranks.gather_objects(get_rng_state(ranks.device))  # CPU generators and its own device's
    if sharded:
        save_sharded(run_dir, name, parallel.sharded_states(parts.policy, parts.optimizer),
                     ranks.rank, ranks.barrier)
    policy_state = parts.policy_state() if not sharded or finished else None
    states = {} if sharded else {"policy.pt": parts.reference.policy_state(policy_state),
                                 "optimizer.pt": parts.optimizer_state()}
    reference_states = parts.reference.checkpoint_states()  # every rank: may gather shards
    if ranks.rank == 0:
        states["scheduler.pt"] = parts.scheduler.state_dict()
        states.update(reference_states)
    return save_on_rank0(run_dir, name, states, step, metrics, trainer_state(rng),
                         functools.partial(write_extras, policy_state=policy_state), keep, ranks,
                         started=sharded)


def restore_training(path: Path, parts: TrainingParts, ranks) -> dict:
    """Load a checkpoint written by save_training into `parts`, and this rank's RNG state.

    Returns:
        The trainer state it was saved with (counters, loss state, ...).
    Raises:
        DamagedCheckpoint: on every rank, a file could not be read or verified (nothing was
            loaded, or a shard failed to load: the next checkpoint loaded replaces it all).
        ConfigError: on every rank, the weights do not fit the model (nothing was loaded).
    """
    states, state = read_for_restore(path, parts.policy, parts.reference.policy_state_to_load, ranks)
    if is_sharded(path):
        loaded = parallel.sharded_states(parts.policy, parts.optimizer)
        load_sharded(path, loaded, ranks)
        parallel.load_sharded_states(parts.policy, parts.optimizer, loaded)
    else:
        parts.load_policy(states["policy.pt"])
        optimizer_state = states["optimizer.pt"]  # {} on ranks that did not read it
        parts.load_optimizer(with_current_kernels(parts.optimizer, optimizer_state)
                             if optimizer_state else optimizer_state)
    parts.scheduler.load_state_dict(states["scheduler.pt"])
    parts.reference.load_checkpoint_states(
        {k: v for k, v in states.items() if k not in STATE_FILES})
    set_rng_state(rng_state_for_rank(state["rng"], ranks.rank), ranks.device)
    return state


def with_current_kernels(optimizer, state: dict) -> dict:
    """A saved optimizer state whose param groups keep this optimizer's kernel choice (fused,
    foreach): that depends on the parameters at hand (e.g. DTensors under tensor parallelism),
    not on the trainer that wrote the checkpoint."""
    groups = [dict(saved, **{k: current[k] for k in ("fused", "foreach") if k in current})
              for saved, current in zip(state["param_groups"], optimizer.param_groups)]
    return dict(state, param_groups=groups)

def save_on_rank0(run_dir: Path, name: str, states: Dict[str, object], step: int,
                  metrics: Dict[str, float], trainer_state: dict,
                  write_extras: Callable[[Path], None], keep: Optional[int], ranks,
                  started: bool) -> Path:
    """Rank 0 writes {run_dir}/{name}/ (write_checkpoint: the arguments are its) and prunes the
    step-* checkpoints to the newest `keep`; every rank then returns, or raises, together.

    Returns:
        The checkpoint's path.
    Raises:
        CheckpointWriteError: on every rank, when rank 0 could not write it (the partial write is
            removed, the previous checkpoints are untouched).
    """
    error = None
    if ranks.rank == 0:
        try:
            final = write_checkpoint(run_dir, name, states, step, metrics, trainer_state,
                                     write_extras, started=started)
            prune_checkpoints(run_dir, keep)
            rank0_print(f"saved checkpoint to {final}")
        except Exception as e:
            error = e
    if ranks.distributed:  # the other ranks must not wait for a save that failed
        message = broadcast_object(None if error is None else str(error))
        if message is not None and error is None:
            error = CheckpointWriteError(message)
    if error is not None:
        raise error
    ranks.barrier()
    return run_dir / name


def read_for_restore(path: Path, policy: torch.nn.Module, policy_state_to_load: Callable,
                     ranks) -> Tuple[dict, dict]:
    """(states, trainer state) of a checkpoint, its files first checked against its manifest
    (verify_files), "policy.pt" already the full state to load and checked against the model.
    With several processes only rank 0 verifies and reads the full policy and optimizer states
    (loading sends each rank its shard; the other ranks get {}), and every rank gets rank 0's
    verdict.

    Args:
        path: the checkpoint directory.
        policy: the (placed) policy the weights must fit.
        policy_state_to_load: (saved policy state, policy) -> the full state to load (the
            reference's: a LoRA checkpoint keeps only the adapter). Called on every rank.
        ranks: this process among the ranks.
    Raises:
        DamagedCheckpoint: on every rank, a file could not be read (nothing was loaded).
        ConfigError: on every rank, the weights do not fit the model (nothing was loaded).
    """
    sharded = is_sharded(path)
    big = () if sharded else ("policy.pt", "optimizer.pt")
    names = tuple(n for n in STATE_FILES
                  if n != "policy.pt" and n != "optimizer.pt" or n in big and ranks.rank == 0)
    out, error = None, None
    try:
        if ranks.rank == 0:  # the others wait for its verdict
            verify_files(path)
        states, state = read_checkpoint(path, names)
        if sharded:
            check_state_dict(policy, sharded_policy_shapes(path), f"checkpoint {path / SHARDED_DIR}")
        else:
            states.setdefault("policy.pt", {})
            states.setdefault("optimizer.pt", {})
            # every rank: the reference may gather shards to complete the saved state
            states["policy.pt"] = policy_state_to_load(states["policy.pt"], policy)
            if ranks.rank == 0:
                check_state_dict(policy, states["policy.pt"], f"checkpoint {path / 'policy.pt'}")
        out = states, state
    except ConfigError as e:
        error = e
    if ranks.distributed:
        verdict = broadcast_object(None if error is None else (type(error).__name__, str(error)))
        if verdict is not None and error is None:
            kind = DamagedCheckpoint if verdict[0] == "DamagedCheckpoint" else ConfigError
            error = kind(verdict[1])
    if error is not None:
        raise error
    return out


def resume(resume_from: Optional[str], run_dir: Path, restore: Callable[[Path], bool],
           restored_step: Callable[[], int]) -> Tuple[Optional[Path], bool]:
    """Restore resume_from, else the newest checkpoint of the run that loads, skipping damaged
    ones with one warning each.

    Args:
        resume_from: the checkpoint the user named, or None.
        run_dir: the run directory.
        restore: loads a checkpoint; returns whether its run had finished; raises
            DamagedCheckpoint (having loaded nothing) when it cannot be read.
        restored_step: the examples seen at the checkpoint just restored.
    Returns:
        (the checkpoint, whether its run had finished), or (None, False) to start from scratch.
    Raises:
        DamagedCheckpoint: resume_from is damaged, or no checkpoint is intact.
    """
    candidates = resume_candidates(resume_from, run_dir)
    for path in candidates:
        try:
            finished = restore(path)
        except DamagedCheckpoint as e:
            if resume_from:
                raise DamagedCheckpoint(f"resume_from={path} is not an intact checkpoint: {e}; "
                                        "pass a step-N/ or LATEST/ directory written by "
                                        "train.py") from None
            rank0_print(f"warning: skipping damaged checkpoint {path}: {e}")
            continue
        if not resume_from:
            for bad, problem in damaged_newer_than(run_dir, restored_step()):
                rank0_print(f"warning: checkpoint {bad} is damaged ({problem}); "
                            f"resuming from {path} instead")
        return path, finished
    if candidates:
        raise no_intact_checkpoint(run_dir, [(p, "unreadable") for p in candidates])
    return None, False
