"""tests/warm_launch.py: a run forked from the warm process is the run a fresh interpreter makes."""
import os

import torch

import warm_launch
from conftest import FAST, logged_values, run_subprocess


def test_a_warm_run_equals_a_fresh_interpreters_run(tmp_path):
    args = [*FAST, "n_examples=16", "eval_every=8", "save_hf_format=false"]
    warm = run_subprocess([*args, f"local_run_dir={tmp_path}/warm"])
    cold = run_subprocess([*args, f"local_run_dir={tmp_path}/cold"], env={"DPO_TEST_COLD_LAUNCH": "1"})
    assert warm.returncode == cold.returncode == 0, warm.stderr[-2000:] + cold.stderr[-2000:]
    assert logged_values(tmp_path / "warm") == logged_values(tmp_path / "cold")
    a, b = (torch.load(tmp_path / run / "LATEST" / "policy.pt", weights_only=True)["state"]
            for run in ("warm", "cold"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert warm.stdout.replace("/warm", "/cold") == cold.stdout.replace("/warm", "/cold")


def test_a_refusal_keeps_its_exit_code_and_one_line(tmp_path):
    result = run_subprocess([*FAST, "batch_size=0", f"local_run_dir={tmp_path}/run"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: batch_size=0")


def test_a_second_run_while_one_is_going_starts_cold(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = warm_launch.popen_train([*FAST, f"local_run_dir={tmp_path}/a"], env,
                                    tmp_path / "a.out", tmp_path / "a.err")
    assert isinstance(first, warm_launch.WarmRun)
    assert warm_launch.zygote_for(env) is None  # busy: run_train would start a fresh interpreter
    assert first.wait(timeout=300) == 0, (tmp_path / "a.err").read_text()[-2000:]
    assert warm_launch.zygote_for(env) is not None
