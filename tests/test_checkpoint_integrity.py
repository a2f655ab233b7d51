"""Checkpoints that lie (issue 27): a full disk on a real small filesystem, content hashes that
catch a damaged file of the right size, and a damaged shard that resume skips."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose, poison_policy_at, run_subprocess
# (finished_run: a finished run with step-8, step-16, step-24 and LATEST, and its final weights)
from test_checkpoints import FINISHED, copy_run, finished_run, policy_state, same_weights  # noqa: F401

# step-16, step-32 and step-48 (5.6 MB each with the embedded model) fit in 20 MB; LATEST
# (7.4 MB: the Hugging Face files too) does not.
FILLING = [*FAST, "n_examples=64", "eval_every=16"]


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs (needs root and mount(8): skipped elsewhere), unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs",
                                 str(mount_point)], capture_output=True, text=True)
    except OSError as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_torch_save_on_a_full_filesystem_is_recognised(small_disk):
    import checkpoints
    with pytest.raises(Exception) as err:  # torch's own RuntimeError, ENOSPC only in its chain
        checkpoints.save_file({"x": torch.zeros(8_000_000)}, small_disk / "big.pt")
    assert checkpoints.is_out_of_space(err.value)
    assert not checkpoints.is_out_of_space(RuntimeError("unexpected pos 704 vs 598"))


@pytest.mark.slow
def test_a_full_filesystem_is_one_line_and_exit_code_4_then_relaunch(small_disk):
    import checkpoints
    run_dir = small_disk / "run"
    result = run_subprocess([*FILLING, f"local_run_dir={run_dir}"])
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"error: no space left writing LATEST to {run_dir}; "
                                              "free space or set keep_checkpoints")
    assert not list(run_dir.glob(".tmp-*")) and not (run_dir / "LATEST").exists()
    assert checkpoints.newest_checkpoint(run_dir) == run_dir / "step-48"
    for name in ("step-16", "step-32"):  # the user frees space
        shutil.rmtree(run_dir / name)
    again = run_subprocess([*FILLING, f"local_run_dir={run_dir}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir / 'step-48'} at 48 examples" in again.stdout
    assert (run_dir / "LATEST" / "policy.pt").is_file()


# ----------------------------------------------------------------------------- content hashes

def flip_bytes(file: Path, n: int = 16):
    """Invert `n` bytes in the middle of `file`: its size is unchanged."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
    file.write_bytes(bytes(data))


def test_every_file_of_a_checkpoint_is_in_its_manifest_with_its_hash(finished_run):
    import json
    import checkpoints
    for name in ("step-8", "LATEST"):
        path = finished_run[0] / name
        manifest = json.loads((path / checkpoints.MANIFEST).read_text())
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.is_file() and p.name != checkpoints.MANIFEST)
        assert manifest["hash"] == checkpoints.HASH and sorted(manifest["files"]) == files
        for file, entry in manifest["files"].items():  # hashed while written == read back
            assert entry == {"size": (path / file).stat().st_size,
                             checkpoints.HASH: checkpoints.hash_file(path / file)}, file
    assert checkpoints.verify_files(finished_run[0] / "LATEST") is True


def test_a_damaged_file_of_the_right_size_is_skipped_on_resume(finished_run, tmp_path, capsys):
    import train
    run_dir = copy_run(finished_run[0], tmp_path / "run")
    shutil.rmtree(run_dir / "LATEST")  # as if killed before the end
    policy = run_dir / "step-24" / "policy.pt"
    flip_bytes(policy)
    train.run(compose([*FINISHED, f"local_run_dir={run_dir}"]))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping damaged checkpoint {run_dir / 'step-24'}: {policy} "
                        "does not match the content hash recorded when it was written (it was "
                        "damaged after the save)"]
    assert f"resuming from {run_dir / 'step-16'} at 16 examples" in out
    assert same_weights(policy_state(run_dir / "LATEST"), finished_run[1])


def test_a_finished_run_whose_latest_is_damaged_is_not_called_complete(finished_run, tmp_path,
                                                                         capsys):
    """A relaunch of a finished run checks LATEST's hashes before saying "complete": a damaged
    LATEST is skipped and the run ends again from the newest intact step, at the same weights."""
    import train
    run_dir = copy_run(finished_run[0], tmp_path / "run")
    policy = run_dir / "LATEST" / "policy.pt"
    flip_bytes(policy)
    train.run(compose([*FINISHED, f"local_run_dir={run_dir}"]))
    out = capsys.readouterr().out
    assert "is complete" not in out
    assert f"warning: skipping damaged checkpoint {run_dir / 'LATEST'}: {policy}" in out
    assert f"resuming from {run_dir / 'step-24'} at 24 examples" in out
    assert same_weights(policy_state(run_dir / "LATEST"), finished_run[1])


def evaluate_models(checkpoint: Path):
    """evaluate.py's (policy, reference, tokenizer, processor, run config, step) of a checkpoint."""
    import evaluate
    from hydra import compose as hydra_compose, initialize_config_dir
    from conftest import ROOT
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = hydra_compose("evaluate", overrides=[f"checkpoint={checkpoint}"])
    return evaluate.load_models(cfg)


def test_every_reader_refuses_a_damaged_file_in_one_line(finished_run, tmp_path):
    import checkpoints
    import export_hf
    import train
    import utils
    run_dir = copy_run(finished_run[0], tmp_path / "run")
    latest, step = run_dir / "step-24", run_dir / "step-16"  # (LATEST: already finished)
    flip_bytes(latest / "policy.pt")
    flip_bytes(step / "config.yaml", 4)
    damaged = "does not match the content hash recorded when it was written"
    with pytest.raises(utils.ConfigError, match=f"^resume_from={latest} is not an intact "
                       f"checkpoint: {latest / 'policy.pt'} {damaged}"):
        train.run(compose([*FINISHED, f"resume_from={latest}", f"local_run_dir={tmp_path}/a"]))
    with pytest.raises(utils.ConfigError, match=f"^model.archive={latest}: "
                       f"{latest / 'policy.pt'} {damaged}"):
        train.run(compose([*FINISHED, f"model.archive={latest}", f"local_run_dir={tmp_path}/b"]))
    with pytest.raises(utils.ConfigError, match=f"^export_hf.py CHECKPOINT={step}: "
                       f"{step / 'config.yaml'} {damaged}"):
        export_hf.export(str(step), str(tmp_path / "hf"))
    with pytest.raises(checkpoints.DamagedCheckpoint, match=f"^{latest / 'policy.pt'} {damaged}"):
        evaluate_models(latest)
    assert not (tmp_path / "a").exists() and not (tmp_path / "hf").exists()


def test_a_checkpoint_without_a_manifest_loads_and_says_it_cannot_be_verified(finished_run,
                                                                              tmp_path, capsys):
    """Checkpoints written before content hashes: no manifest.json, no "manifest" key."""
    import checkpoints
    import train
    run_dir = copy_run(finished_run[0], tmp_path / "run")
    shutil.rmtree(run_dir / "LATEST")
    old = run_dir / "step-24"
    (old / checkpoints.MANIFEST).unlink()
    state = torch.load(old / checkpoints.TRAINER_STATE, weights_only=True)
    del state["manifest"]
    torch.save(state, old / checkpoints.TRAINER_STATE)
    train.run(compose([*FINISHED, f"local_run_dir={run_dir}"]))
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "cannot be verified" in line] == [
        f"note: {old} was written without {checkpoints.MANIFEST} (before checkpoints held "
        "content hashes); its files cannot be verified"]
    assert "warning:" not in out and f"resuming from {old} at 24 examples" in out
    assert same_weights(policy_state(run_dir / "LATEST"), finished_run[1])
    # a checkpoint that was written with a manifest and lost it is damaged, not old
    (run_dir / "step-16" / checkpoints.MANIFEST).unlink()
    assert checkpoints.inspect_checkpoint(run_dir / "step-16")[1] == "manifest.json is missing"


def test_divergence_names_a_checkpoint_that_verified(tmp_path, monkeypatch):
    import trainers
    from test_train import make_trainer
    trainer = make_trainer(["n_examples=64", "eval_every=16"], tmp_path)
    run_dir = tmp_path / "run"
    real_step = trainers.BasicTrainer.train_step

    def damage_step_32(self, batch):
        if self.example_counter == 40:
            flip_bytes(run_dir / "step-32" / "optimizer.pt")
        return real_step(self, batch)

    monkeypatch.setattr(trainers.BasicTrainer, "train_step", damage_step_32)
    poison_policy_at(monkeypatch, 40)
    with pytest.raises(trainers.TrainingDiverged) as err:
        trainer.train()
    good = run_dir / "step-16"
    assert f"the last good checkpoint is {good};" in str(err.value)


# ----------------------------------------------------------------------------- damaged shards

def overwrite(file: Path, start: int, n: int):
    """Overwrite `n` bytes of `file` from `start` with other bytes: its size is unchanged."""
    with open(file, "r+b") as f:
        f.seek(start)
        f.write(bytes((7 * i + 1) % 256 for i in range(n)))


def forget_manifest(checkpoint: Path):
    """Make `checkpoint` look written before content hashes: no manifest, no "manifest" key."""
    import checkpoints
    (checkpoint / checkpoints.MANIFEST).unlink()
    state = torch.load(checkpoint / checkpoints.TRAINER_STATE, weights_only=True)
    del state["manifest"]
    torch.save(state, checkpoint / checkpoints.TRAINER_STATE)


@pytest.mark.slow
def test_a_damaged_shard_makes_every_rank_fall_back(tmp_path):
    """checkpoint_format=sharded over 2 processes: 200 KB of rank 1's shard of step-24 damaged
    (size unchanged). With a manifest the hash finds it; without one (an older checkpoint) the
    shard fails to load. Either way every rank skips step-24 with one warning, resumes from
    step-16 and ends where the undisturbed run ended."""
    import checkpoints
    from test_distributed import train_2proc
    args = ("checkpoint_format=sharded", "eval_every=8")  # step-8, -16, -24, LATEST
    whole = tmp_path / "whole"
    train_2proc("FSDPTrainer", whole, *args)
    final = checkpoints.load_policy_state(whole / "LATEST")
    # evaluate.py reads a sharded step-N/ (gathered in its one process)
    policy, _, _, _, _, step = evaluate_models(whole / "step-16")
    assert step == 16 and same_weights(policy.state_dict(),
                                       checkpoints.load_policy_state(whole / "step-16"))
    for case in ("hashed", "older"):
        run_dir = copy_run(whole, tmp_path / case)
        shutil.rmtree(run_dir / "LATEST")
        shard = run_dir / "step-24" / "sharded" / "__1_0.distcp"
        if case == "hashed":
            overwrite(shard, shard.stat().st_size // 2 - 100_000, 200_000)
            problem = (f"{shard} does not match the content hash recorded when it was written "
                       "(it was damaged after the save)")
        else:
            forget_manifest(run_dir / "step-24")
            overwrite(shard, 0, 200_000)  # the first records' headers: torch cannot read them
            # (both ranks read from rank 1's file: the first that failed is named)
            problem = f"its shards in {shard.parent} could not be read (rank "
            with pytest.raises(checkpoints.DamagedCheckpoint, match="could not be read"):
                checkpoints.load_policy_state(run_dir / "step-24")  # export_hf.py, evaluate.py
        output = train_2proc("FSDPTrainer", run_dir, *args)
        warnings = [line for line in output.splitlines() if "warning:" in line]
        assert len(warnings) == 1, output[-4000:]
        assert warnings[0].startswith(f"warning: skipping damaged checkpoint "
                                      f"{run_dir / 'step-24'}: {problem}"), warnings
        assert "Traceback" not in output
        assert f"resuming from {run_dir / 'step-16'} at 16 examples" in output
        resumed = checkpoints.load_policy_state(run_dir / "LATEST")
        assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k])
                                                       for k in final), case


# ----------------------------------------------------------------------------- one line is one line

def test_a_symlinked_latest_is_replaced_and_no_link_is_left_behind(tmp_path):
    import checkpoints
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    checkpoints.write_checkpoint(tmp_path, "elsewhere", {"policy.pt": {"w": torch.ones(2)}}, 8,
                                 {}, {"example_counter": 8})
    (run_dir / "LATEST").symlink_to(elsewhere)
    checkpoints.write_checkpoint(run_dir, "LATEST", {"policy.pt": {"w": torch.zeros(2)}}, 16, {},
                                 {"example_counter": 16})
    assert [p.name for p in run_dir.iterdir()] == ["LATEST"]
    assert not (run_dir / "LATEST").is_symlink() and checkpoints.verify_files(run_dir / "LATEST")
    assert checkpoints.verify_files(elsewhere)  # what the link pointed to is not the run's
    (run_dir / ".old-LATEST-1").symlink_to(elsewhere)  # as a crash mid-replace leaves it
    checkpoints.remove_partial_writes(run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["LATEST"] and (elsewhere / "policy.pt").is_file()


def test_a_raw_pickle_is_refused_in_one_line_without_torch_warnings(tmp_path):
    import pickle
    import warnings
    import utils
    raw = tmp_path / "policy.pt"
    raw.write_bytes(pickle.dumps({"state": {"w": [1.0, 2.0]}}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(utils.ConfigError) as err:
            utils.safe_torch_load(str(raw), "model.archive")
    assert [str(w.message) for w in caught] == []
    message = str(err.value)
    assert message.startswith(f"model.archive file {raw} needs arbitrary code to unpickle and was "
                              "refused (only tensors and plain containers load): ")
    # torch's reason (its wording varies with the version), not its advice to drop weights_only
    assert "\n" not in message and "weights_only" not in message


def test_a_json_error_names_its_column_once(tmp_path):
    import data_files
    from preference_datasets import DatasetFormatError
    with pytest.raises(DatasetFormatError) as err:
        list(data_files._iter_jsonl(tmp_path / "d.jsonl", b'{"prompt": "unterminated\n'))
    assert "at at" not in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'd.jsonl'}, line 1: not valid JSON "
                                     "(Unterminated string starting at: column 12).")
