"""benchmarks/gpu_check.py: its CPU dry run trains ours and TRL's DPOTrainer on the same pairs and
reports both with the MFU formulas; the FLOP counts match hand-worked values; without CUDA (and
without --dry-run) it refuses in one line, and a break in the path is one line too."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_subprocess

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

SIDES = ("ours", "trl")


@pytest.fixture(scope="module")
def dry_run():
    """One `python benchmarks/gpu_check.py --dry-run`: (exit status, stderr, its JSON line).
    The check runs TRL's DPOTrainer beside ours: TRL is a test-only package (.ci/run installs it),
    so a clone with requirements.txt alone skips these tests."""
    pytest.importorskip("trl")
    # one math thread, as every other test run (.ci/run): the dry run's default of two would
    # oversubscribe a core the other test worker uses (measured 12-14 s against 8 s)
    proc = run_subprocess(["--dry-run", "--threads", "1"], timeout=300, script="benchmarks/gpu_check.py")
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, proc.stderr, json.loads(lines[-1]) if lines else None


@pytest.mark.slow
def test_dry_run_trains_both_sides_on_the_cpu(dry_run):
    rc, err, r = dry_run
    assert rc == 0, err[-2000:]
    assert r["dry_run"] and r["device"] == "cpu"
    assert "sdpa instead of flex_attention" in r["note"]
    for side in SIDES:
        s = r[side]
        assert s["attention"] == "sdpa"
        for key in ("pairs_per_s", "tokens_per_s", "padded_tokens_per_s", "timed_s",
                    "step_time_s_median", "peak_memory_mb"):
            assert s[key] > 0, (side, key, s[key])
        assert len(s["step_times_s"]) == 3 and all(t > 0 for t in s["step_times_s"])
        # policy and reference start equal, so the first DPO loss is ln 2 (float rounding only)
        assert s["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert r["ours"]["layout"] == "prompt shared, pairs packed"
    assert r["ours"]["n_params"] == r["trl"]["n_params"] == r["model"]["n_params"]


@pytest.mark.slow
def test_dry_run_counts_the_same_pairs_and_tokens_on_both_sides(dry_run):
    _, err, r = dry_run
    assert r is not None, err[-2000:]
    # the dry run's 3 steps of 4 pairs: the first 12 pairs of the HH lengths file, each counted
    # as prompt+chosen and prompt+rejected (worked out here from the file itself)
    lengths = json.loads(Path(ROOT / "benchmarks" / "hh_lengths.json").read_text())[:12]
    tokens = sum(2 * p + c + q for p, c, q in lengths)
    for side in SIDES:
        assert r[side]["pairs_all_steps"] == 12
        assert r[side]["tokens_all_steps"] == tokens
        assert r[side]["pairs_timed"] == 8  # the 2 steps after the warm-up step


@pytest.mark.slow
def test_dry_run_reports_mfu_by_both_definitions_with_the_formulas(dry_run):
    _, err, r = dry_run
    assert r is not None, err[-2000:]
    assert "6*N + 12*L*H*Q*n" in r["formulas"]["torchtitan"]
    assert "reference forward" in r["formulas"]["torchtitan"]
    assert "3*F(n)" in r["formulas"]["open_instruct"]
    assert "reference forward" in r["formulas"]["open_instruct"]
    assert r["peak_bf16_flops"] is None and len(r["mfu_null_reason"].splitlines()) == 1
    for side in SIDES:
        for definition in ("torchtitan", "open_instruct"):
            m = r[side]["mfu"][definition]
            assert m["tflops_per_s"] > 0
            assert m["mfu"] is None and m["mfu_policy_only"] is None and m["mfu_padded"] is None


DIMS = {"L": 1, "H": 2, "K": 2, "Q": 4, "h": 8, "I": 16, "V": 10, "N": 1000, "n_params": 1080}


def test_flop_counts_match_hand_worked_values():
    # torchtitan: n * (6*N + 12*L*H*Q*n) = 3 * (6000 + 12*1*2*4*3) = 3 * 6288
    assert gpu_check.torchtitan_flops(3, DIMS, 6) == 18864
    assert gpu_check.torchtitan_flops(3, DIMS, 2) == 18864 // 3
    # open-instruct, n = 3: projections 2*3*8*4*(2+4) + 2*3*2*4*8 = 1152 + 384, scores and values
    # 4*2*4*9 = 288, softmax 4*2*9 = 72, MLP 6*3*8*16 + 3*16 = 2352, output layer 2*3*8*10 = 480
    forward = 1152 + 384 + 288 + 72 + 2352 + 480
    assert gpu_check.open_instruct_flops(3, DIMS, 2) == forward
    assert gpu_check.open_instruct_flops(3, DIMS, 6) == 3 * forward


def test_mfu_divides_by_time_and_peak_and_the_reference_is_a_quarter():
    out = gpu_check.utilization([3, 5], [[2, 5, 8]], 2.0, DIMS, 1e4)
    for name, flops in gpu_check.DEFINITIONS.items():
        both = sum(flops(n, DIMS, 6) + flops(n, DIMS, 2) for n in (3, 5))
        assert out[name]["mfu"] == pytest.approx(both / 2.0 / 1e4)
        assert out[name]["tflops_per_s"] == pytest.approx(both / 2.0 / 1e12)
        # the policy's forward and backward are 3 of the 4 forwards' worth counted
        assert out[name]["mfu_policy_only"] == pytest.approx(0.75 * out[name]["mfu"])
        padded = 2 * (flops(5, DIMS, 6) + flops(5, DIMS, 2))  # two rows of length 5
        assert out[name]["mfu_padded"] == pytest.approx(padded / 2.0 / 1e4)
    assert gpu_check.utilization([3], [[1, 3, 3]], 1.0, DIMS, None)["torchtitan"]["mfu"] is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-16GB", None)])
def test_peak_flops_by_device_name(name, peak):
    value, reason = gpu_check.peak_flops("cuda", name)
    assert value == peak
    assert (reason is None) == (peak is not None)
    if reason is not None:
        assert name in reason and len(reason.splitlines()) == 1


def test_without_cuda_it_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("gpu_check: no CUDA device") and "--dry-run" in err


def test_a_break_in_the_path_is_one_line_and_exit_status_1(monkeypatch, capsys):
    pytest.importorskip("trl")  # the check starts by importing TRL's side (test-only, see dry_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main sets it for --dry-run; restored after
    threads = torch.get_num_threads()  # main sets the dry run's thread count; restored after
    try:
        assert gpu_check.main(["--dry-run", "--override", "lr=-1"]) == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: failed in ours: ConfigError: lr=-1")
    trace = Path(err[0].rpartition("(traceback: ")[2].rstrip(")"))
    assert "ConfigError" in trace.read_text()
    trace.unlink()
