"""The README's main job (SFT, then DPO at beta 0.1 from the SFT model) on the embedded default
reaches the held-out reward accuracy the README states, for every seed (issue 28 item 2).

Under the former tiny preset (lr 1e-3, no clipping) DPO's loss spiked mid-training, so float
rounding (threads, machine, layout) decided the outcome: seeds 0..4 ended at 0.83, 0.63, 0.70,
0.61, 0.65. The bar of 0.88 sits well below the 0.94 every seed reaches under the current preset
(README, "The embedded default"), so rounding on another machine cannot break it; a result that
depends on the seed can."""
import time

import pytest

from conftest import read_metrics, readme_sft, run_subprocess

SEEDS = range(5)
BAR = 0.88


def main_job(run_dir, seed: int) -> float:
    """The README's two commands with seed=SEED; the held-out accuracy of DPO's final evaluation.
    The SFT run (the first command) is shared with the other tests that start from it."""
    sft = readme_sft(seed)
    dpo = run_subprocess([f"seed={seed}", "loss=dpo", "loss.beta=0.1",
                          f"model.archive={sft}/LATEST/policy.pt", f"local_run_dir={run_dir}/dpo"])
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    evals = [m for m in read_metrics(run_dir / "dpo") if "rewards_eval/accuracies" in m]
    assert evals[-1]["counters/examples"] > evals[-2]["counters/examples"]  # the final evaluation
    return evals[-1]["rewards_eval/accuracies"]


@pytest.mark.slow
@pytest.mark.own_unit  # each seed a unit of work of its own for the test workers (conftest.py)
@pytest.mark.parametrize("seed", SEEDS)
def test_main_job_reaches_the_bar_for_every_seed(seed, tmp_path):
    # each seed in its own processes and directories: independent runs
    start = time.time()
    accuracy = main_job(tmp_path, seed)
    print(f"seed {seed}: held-out accuracy {accuracy:.3f}; main job {time.time() - start:.0f} s")
    assert accuracy >= BAR, accuracy
    # the time is printed, not asserted: a benchmark, not a timed test (README states the figure)
