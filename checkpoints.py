"""Checkpoints on disk: writing one atomically, finding the newest intact one, reading it back,
pruning old ones and cleaning up after a crash.

A checkpoint is a directory {run_dir}/step-{examples}/ or {run_dir}/LATEST/ (the end of the run)
holding one file per named state (policy.pt, optimizer.pt, scheduler.pt, ...; each a dict
{"step_idx", "state", "metrics"}), whatever extra files the caller writes (config.yaml, the Hugging
Face export of LATEST), and trainer_state.pt, written last: its presence marks the checkpoint
complete, and it records the size of every other file, so a file truncated or deleted afterwards
is found without reading it. It is written under a temporary name and renamed into place, so a
crash never leaves a half checkpoint under the final name. Nothing here knows about trainers:
callers pass the state dicts and a function that writes their extra files.
"""
import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from utils import ConfigError, safe_torch_load

# Written last; the checkpoint counts as complete once it exists.
TRAINER_STATE = "trainer_state.pt"
# The states every checkpoint holds, in the order they are written (a trainer may add more, e.g.
# a reference's), and with trainer_state.pt the files that make a checkpoint complete.
STATE_FILES = ("policy.pt", "optimizer.pt", "scheduler.pt")
CHECKPOINT_FILES = STATE_FILES + (TRAINER_STATE,)


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

    Intact means: trainer_state.pt reads back, and every file it lists has the size it had when
    written (checkpoints written before sizes were recorded: every file in CHECKPOINT_FILES
    exists). File contents are read only when the checkpoint is loaded (read_checkpoint)."""
    if not (path / TRAINER_STATE).is_file():
        return None, f"{TRAINER_STATE} is missing (the save did not finish)"
    try:
        state = safe_torch_load(str(path / TRAINER_STATE), "checkpoint")
    except ConfigError as e:
        return None, str(e)
    sizes = state.get("files") if isinstance(state, dict) else None
    if not isinstance(sizes, dict):
        sizes = {name: None for name in STATE_FILES}
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
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_file(obj, path: Path):
    """torch.save through a Python file object: a full disk then raises OSError(ENOSPC) rather
    than torch's own writer's "unexpected pos" RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def is_out_of_space(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # Writers that wrap the OS error in their own (safetensors) keep its text.
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


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
        trainer_state: what resuming needs besides the states (counters, RNG, ...); written last,
            with "files" (each other file's size) and "state_files" (the names in `states`).
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
        for fname, state in states.items():
            save_file({"step_idx": step, "state": state, "metrics": metrics}, tmp / fname)
        if write_extras is not None:
            write_extras(tmp)
        save_file(dict(trainer_state, files=file_sizes(tmp), state_files=list(states)),
                  tmp / TRAINER_STATE)
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


def load_sharded(path: Path, states: Dict[str, object]):
    """Every rank: fill `states` (shaped as for save_sharded, this rank's shards) in place from
    path/sharded/ (any number of processes may have written it)."""
    import torch.distributed.checkpoint as dcp
    check_sharded_metadata(path)
    dcp.load(states, checkpoint_id=str(path / SHARDED_DIR))


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
    dcp.load({"policy": state}, checkpoint_id=str(path / SHARDED_DIR), no_dist=True)
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
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_writes(run_dir: Path):
    """Delete directories a crash during a save left behind."""
    for stale in list(run_dir.glob(".tmp-*")) + list(run_dir.glob(".old-*")):
        shutil.rmtree(stale, ignore_errors=True)
