"""Checkpoints that lie (issue 27): a full disk on a real small filesystem, content hashes that
catch a damaged file of the right size, and a damaged shard that resume skips."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_subprocess

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
