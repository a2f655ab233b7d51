"""The performance work is exact: chunked completion-only log-probs train exactly like full logits,
precomputed reference log-probs train exactly like a live reference, and the benchmark runs."""
import copy
import json
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, compose, read_metrics, run_in_process

DPO = ["loss=dpo", "loss.beta=0.1"]
# Fewer examples than FAST's and no Hugging Face export: these tests compare runs, not outputs.
SHORT = [*FAST, "n_examples=32", "n_eval_examples=16", "eval_every=16", "save_hf_format=false"]


def make_trainer(overrides, tmp_path, tokenizer, perturb_reference=False):
    import train
    import trainers
    from omegaconf import OmegaConf
    config = compose([*SHORT, f"local_run_dir={tmp_path}/run", *overrides])
    OmegaConf.resolve(config)
    train.validate_config(config, 1)
    policy, reference = train.build_models(config, tokenizer)
    if perturb_reference:  # identical policy and reference make every margin 0
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    Path(config.local_run_dir).mkdir(parents=True)
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir,
                                    reference_model=reference, tokenizer=tokenizer)
    trainer.build_optimizer()
    return trainer


def plain_dpo_loss(policy, reference, batch, beta):
    """The textbook computation: full (B, T, V) logits from model(...), then get_batch_logps."""
    import losses
    import logps as logps_module
    logps = {}
    for side in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        logps[f"policy_{side}"] = logps_module.get_batch_logps(
            policy(input_ids=ids, attention_mask=mask).logits, labels)
        with torch.no_grad():
            logps[f"reference_{side}"] = logps_module.get_batch_logps(
                reference(input_ids=ids, attention_mask=mask).logits, labels)
    per_pair, _, _ = losses.preference_loss(logps["policy_chosen"], logps["policy_rejected"],
                                            logps["reference_chosen"], logps["reference_rejected"],
                                            beta=beta)
    return per_pair.mean()


@pytest.mark.parametrize("chunk", [5, 1024])  # many chunks / everything in one kept chunk
def test_chunked_train_step_equals_full_logits_in_float64(chunk, tmp_path, tokenizer):
    # One padded row per sequence, as the textbook computation has it: in the shared-prompt
    # layout the float32 rotary tables come out of other vectorised kernels and differ by an ulp
    # (tests/test_packing.py checks that layout to 1e-5 in float32).
    trainer = make_trainer([*DPO, "model.policy_dtype=float64", "model.reference_dtype=float64",
                            f"logps_chunk_size={chunk}", "optimizer=SGD", "max_grad_norm=1e9",
                            "warmup_steps=0", "share_prompt=false", "packing=false"],
                           tmp_path, tokenizer, perturb_reference=True)
    policy0 = copy.deepcopy(trainer.policy)
    batch = next(iter(trainer.train_iterator()))

    # The trainer's own step, with the gradients caught before the optimizer uses them.
    grads = {}
    clip = trainer.clip_gradient

    def catch_then_clip():
        grads.update({n: p.grad.clone() for n, p in trainer.policy.named_parameters()})
        return clip()

    trainer.clip_gradient = catch_then_clip
    step_losses = []
    batch_loss = trainer.batch_loss

    def catch_loss(*args, **kwargs):
        loss, metrics = batch_loss(*args, **kwargs)
        step_losses.append(loss.detach())
        return loss, metrics

    trainer.batch_loss = catch_loss
    trainer.train_step(batch)

    loss = plain_dpo_loss(policy0, trainer.reference.model, batch, beta=0.1)
    loss.backward()
    assert step_losses[0].dtype == torch.float64
    assert step_losses[0].item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-14)
    for name, p in policy0.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-9, atol=1e-12), name
    # SGD applied exactly those gradients
    for (name, p), p0 in zip(trainer.policy.named_parameters(), policy0.parameters()):
        assert torch.allclose(p, p0 - trainer.config.lr * p0.grad, rtol=1e-12, atol=1e-15), name


def test_no_full_logits_are_built(tmp_path, tokenizer):
    # A vocabulary large enough that (batch x length x vocabulary) logits dwarf everything else.
    trainer = make_trainer([*DPO, "+model.from_config.vocab_size=8192", "batch_size=32"],
                           tmp_path, tokenizer)
    batch = next(iter(trainer.train_iterator()))
    head = trainer.policy.get_output_embeddings()
    full = min(batch[f"{s}_input_ids"].numel() for s in ("chosen", "rejected")) * 8192 * 4

    def largest_allocation(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events())

    with torch.no_grad():  # the check sees full logits where they are built
        assert largest_allocation(lambda: trainer.policy(input_ids=batch["chosen_input_ids"])) >= full

    def refuse(*args, **kwargs):
        raise AssertionError("the output layer was applied to every position")

    for model in (trainer.policy, trainer.reference.model):
        model.get_output_embeddings().forward = refuse
    assert head.weight.shape[0] == 8192
    assert 0 < largest_allocation(lambda: trainer.train_step(batch)) < full / 2


def test_batches_are_grouped_by_length_and_sides_padded_separately(tmp_path, tokenizer):
    def padding(group_by_length):
        trainer = make_trainer([*DPO, f"group_by_length={group_by_length}", "n_examples=256",
                                f"local_run_dir={tmp_path}/{group_by_length}"], tmp_path, tokenizer)
        pads, widths = 0, []
        for batch in trainer.train_iterator():
            for side in ("chosen", "rejected"):
                mask = batch[f"{side}_attention_mask"]
                pads += int((mask == 0).sum())
                assert mask.shape[1] == int(mask.sum(1).max())  # padded to its own longest only
                widths.append(mask.shape[1])
        return pads, widths

    grouped, grouped_widths = padding(True)
    plain, _ = padding(False)
    assert grouped < plain / 2
    assert grouped_widths != sorted(grouped_widths, reverse=True)  # still shuffled


def _watch_reference(monkeypatch):
    """Count the reference model's forwards and keep a weak reference to it."""
    import train
    seen = {"forwards": 0, "model": None}
    build = train.build_models

    def build_and_watch(config, tokenizer):
        policy, reference = build(config, tokenizer)
        reference.model.register_forward_pre_hook(
            lambda *a: seen.__setitem__("forwards", seen["forwards"] + 1))
        seen["model"] = weakref.ref(reference)
        return policy, reference

    monkeypatch.setattr(train, "build_models", build_and_watch)
    return seen


def test_precomputed_reference_log_probs_train_identically_and_are_reused(tmp_path, monkeypatch,
                                                                          capsys):
    import ref_cache
    import trainers
    # a cache of its own: CI shares one cache between concurrent test workers (DPO_TEST_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache_dir = ref_cache.reference_cache_dir()
    before = set(cache_dir.glob("ref-logps-*.pt")) if cache_dir.exists() else set()

    live = read_metrics(run_in_process([*SHORT, *DPO, f"local_run_dir={tmp_path}/live"]))

    seen = _watch_reference(monkeypatch)
    during = []
    step = trainers.BasicTrainer.train_step

    def step_and_check(self, batch):
        during.append((self.reference.model is None, seen["model"]() is None))
        return step(self, batch)

    monkeypatch.setattr(trainers.BasicTrainer, "train_step", step_and_check)
    first = read_metrics(run_in_process([*SHORT, *DPO, "precompute_ref_log_probs=true",
                                         f"local_run_dir={tmp_path}/first"]))
    assert seen["forwards"] > 0
    assert during and all(a and b for a, b in during)  # no reference model alive while training
    files = set(cache_dir.glob("ref-logps-*.pt")) - before
    assert len(files) == 1
    assert "saved them to" in capsys.readouterr().out

    for key in ("loss/train", "loss/eval", "rewards_train/margins", "rewards_eval/margins"):
        a = [m[key] for m in live if key in m]
        b = [m[key] for m in first if key in m]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, abs=1e-5), key

    seen["forwards"] = 0
    second = read_metrics(run_in_process([*SHORT, *DPO, "precompute_ref_log_probs=true",
                                          f"local_run_dir={tmp_path}/second"]))
    assert seen["forwards"] == 0  # the cache file was reused
    assert "loaded the reference log-probs of" in capsys.readouterr().out
    assert [m.get("loss/train") for m in second] == [m.get("loss/train") for m in first]


def test_a_sequence_missing_from_the_cache_is_an_error(tmp_path, tokenizer):
    import references
    trainer = make_trainer([*DPO, "precompute_ref_log_probs=true"], tmp_path, tokenizer)
    trainer.prepare_reference()
    assert trainer.reference.model is None
    batch = trainer.rank_slice(next(iter(trainer.train_iterator())), 0, 1)
    trainer.batch_loss(batch, train=True)  # every training sequence is there
    batch["rejected_input_ids"][0, 0] += 1
    with pytest.raises(references.ReferenceCacheMiss, match="rejected sequence of this batch has no "
                                                          "precomputed reference log-prob"):
        trainer.batch_loss(batch, train=True)


@pytest.mark.slow
def test_precomputed_reference_under_fsdp_trains_like_a_live_reference(tmp_path):
    """Two CPU processes (gloo) each score their share of every micro-batch; the shares are merged
    into one cache file, and training matches one process with a live reference."""
    settings = [*SHORT, *DPO, "gradient_accumulation_steps=2", "warmup_steps=0", "n_examples=24"]
    live = read_metrics(run_in_process([*settings, f"local_run_dir={tmp_path}/live"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *settings, "trainer=FSDPTrainer", "precompute_ref_log_probs=true",
           f"local_run_dir={tmp_path}/fsdp"]
    # a cache of its own, so that this run computes its cache file (CI shares one cache between
    # concurrent test workers, DPO_TEST_CACHE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    with open(tmp_path / "fsdp.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: a hang is killed whole
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = (tmp_path / "fsdp.log").read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "precompute_ref_log_probs: saved them to" in output
    sharded = read_metrics(tmp_path / "fsdp")
    for key in ("loss/train", "loss/eval"):
        a = [m[key] for m in live if key in m]
        b = [m[key] for m in sharded if key in m]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, abs=1e-5), key


@pytest.mark.parametrize("extra", [[], ["--precompute-ref"]])
def test_benchmark_prints_its_json_line(extra, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import dpo_throughput
    threads = torch.get_num_threads()
    try:
        dpo_throughput.main(["--hidden", "32", "--layers", "1", "--vocab", "512", "--prompt-len", "8",
                             "--response-len", "8", "--batch", "2", "--steps", "2",
                             "--warmup-steps", "1", *extra])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("examples_per_s", "tokens_per_s", "peak_rss_mb", "final_loss", "settings"):
        assert key in result, key
    assert result["examples_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["examples_per_s"] * 2 * 16, rel=1e-3)
    settings = result["settings"]
    assert (settings["vocab"], settings["prompt_len"], settings["response_len"]) == (512, 8, 8)
    assert settings["precompute_ref"] == bool(extra)
    assert result["reference_in_memory"] is not bool(extra)


# A "training step" that frees and re-allocates 48 MiB (above glibc's adaptive mmap threshold,
# 32 MiB at most) and two smaller blocks; prints the page faults of the eleventh step and what
# keep_freed_memory returned.
_REALLOCATE = """
import resource, sys, torch
{imports}
def step():
    a = torch.ones(12 << 20); b = torch.ones(3 << 20); del a; c = torch.ones(6 << 20); del b, c
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, {applied})
"""


def _reallocation_faults(imports: str, applied: str, env=None):
    code = _REALLOCATE.format(imports=imports, applied=applied)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return int(out[0]), out[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_training_keeps_freed_memory_for_the_next_step():
    pages = (48 << 20) // 4096
    # importing train (as every entry point does) applies the settings: no page is faulted again
    faults, applied = _reallocation_faults("import train, utils", "utils.keep_freed_memory()")
    assert faults < pages // 20 and applied == "True"
    # plain glibc gives the 48 MiB back to the kernel and faults every page in again
    faults, _ = _reallocation_faults("", "None")
    assert faults >= pages // 2
    # a user's own MALLOC_* setting wins: nothing is changed (utils alone: importing train takes
    # twice as long and only calls the same function)
    keep = "import utils; utils.keep_freed_memory()"
    faults, applied = _reallocation_faults(keep, "utils.keep_freed_memory()", {"MALLOC_TOP_PAD_": "131072"})
    assert faults >= pages // 2 and applied == "False"
    _, applied = _reallocation_faults(keep, "utils.keep_freed_memory()", {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"})
    assert applied == "False"
