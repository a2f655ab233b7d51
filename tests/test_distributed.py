"""FSDPTrainer and TensorParallelTrainer against BasicTrainer: two CPU processes (gloo) under
torchrun train on the same global batches as one process and must log the same per-step losses,
end with the same weights and write checkpoints that load into a plain model and resume.

Every multi-process run is killed whole on a timeout, so a rank that hangs cannot hang the suite:
train.py's ranks are forked from a warm process with torchrun's environment (torchrun() below); the
tests of torchrun itself start `python -m torch.distributed.run` in a session of its own."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import warm_launch
from conftest import ROOT, compose, read_metrics, run_in_process, run_subprocess

# Four DPO updates of 8 examples in 2 micro-batches, clipped at every step (grad norms are ~0.5),
# evaluated at 0, 16 and 32 examples (a step-16 checkpoint to resume from).
COMMON = ["loss=dpo", "loss.beta=0.1", "n_examples=32", "batch_size=8",
          "gradient_accumulation_steps=2", "eval_batch_size=16", "n_eval_examples=16",
          "eval_every=16", "sample_during_eval=false", "wandb.enabled=false",
          "minimum_log_interval_secs=0", "max_grad_norm=0.2", "warmup_steps=0"]
RUN_TIMEOUT = 240

LOSS_RTOL_FP32 = 1e-5
LOSS_RTOL_BF16 = 5e-3
WEIGHT_ATOL = 1e-4


def torchrun(script_and_args, tmp_dir: Path, nproc: int = 2, timeout: int = RUN_TIMEOUT,
             real: bool = False):
    """`python -m torch.distributed.run --standalone --nproc_per_node=N ...` in the repository
    root; the whole process group is killed if it outlives `timeout`. The N workers (train.py or
    a test's worker script) are forked from the test worker's warm process with the environment
    torchrun gives them (tests/warm_launch.py: no interpreter start per rank), unless `real` (a
    command the docs show as tested); the tests of torchrun's own features (restarts, several
    nodes) start it themselves."""
    if not real and (result := run_warm(script_and_args[0], script_and_args[1:], tmp_dir, nproc,
                                        timeout)) is not None:
        return result
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *script_and_args]
    return run_killable(cmd, tmp_dir, timeout)


def launch_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def next_log(tmp_dir: Path) -> Path:
    return tmp_dir / f"log-{len(list(tmp_dir.glob('log-*')))}.txt"


def run_warm(script: str, args, tmp_dir: Path, nproc: int, timeout: int):
    """(exit code, log) of SCRIPT ARGS in `nproc` ranks forked from the warm process, or None where
    no warm process fits this environment (the caller starts it cold)."""
    log = next_log(tmp_dir)
    try:
        rc = warm_launch.run_ranks(args, launch_env(), nproc, log, timeout, script)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} {' '.join(map(str, args[-2:]))} hung for {timeout}s; "
                    f"log: {log.read_text()[-3000:]}")
    return None if rc is None else (rc, log.read_text())


def run_killable(cmd, tmp_dir: Path, timeout: int = RUN_TIMEOUT):
    """`cmd` with stdout and stderr in one log, killed whole if it outlives `timeout`; a program of
    the repository (`python SCRIPT ARGS`) is forked from the warm process (tests/warm_launch.py)."""
    if (cmd[0] == sys.executable and not cmd[1].startswith("-")
            and (result := run_warm(cmd[1], cmd[2:], tmp_dir, 1, timeout)) is not None):
        return result
    env, log = launch_env(), next_log(tmp_dir)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{' '.join(cmd[-3:])} hung for {timeout}s; log: {log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


def train_2proc(trainer: str, run_dir: Path, *extra) -> str:
    rc, output = torchrun(["train.py", *COMMON, f"trainer={trainer}", f"local_run_dir={run_dir}",
                           *extra], run_dir.parent)
    assert rc == 0, output[-4000:]
    return output


def column(run_dir: Path, key: str):
    return [m[key] for m in read_metrics(run_dir) if key in m]


def policy_state(run_dir: Path, name: str = "LATEST"):
    return torch.load(run_dir / name / "policy.pt", weights_only=True)["state"]


def assert_same_losses(run_dir: Path, base_dir: Path, rtol: float) -> float:
    """The largest relative difference of the logged train and eval losses."""
    overall = 0.0
    for key in ("loss/train", "loss/eval"):
        got, want = column(run_dir, key), column(base_dir, key)
        assert len(got) == len(want) and want, key
        worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
        assert worst <= rtol, f"{key}: {got} vs {want} (max relative difference {worst:.2e})"
        overall = max(overall, worst)
    return overall


def max_weight_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The single-process BasicTrainer run every multi-process run is compared with."""
    run_dir = run_in_process([*COMMON, f"local_run_dir={tmp_path_factory.mktemp('basic')}/run"])
    losses = column(run_dir, "loss/train")
    assert len(losses) == 4 and len(set(losses)) > 1  # the policy trained
    assert min(column(run_dir, "grad_norm")) > 0.2  # clipping active at every step
    return run_dir


@pytest.fixture(scope="module")
def initial_weights(tokenizer):
    import train
    from omegaconf import OmegaConf
    config = compose([*COMMON, "local_run_dir=/tmp/unused"])
    OmegaConf.resolve(config)
    policy, _ = train.build_models(config, tokenizer)
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def mean_abs_diff(a: dict, b: dict) -> float:
    return (torch.cat([(a[k].float() - b[k].float()).flatten() for k in sorted(a)]).abs().mean()
            .item())


def check_against_baseline(run_dir: Path, baseline: Path, initial: dict, tokenizer,
                           bf16: bool = False):
    loss_diff = assert_same_losses(run_dir, baseline, LOSS_RTOL_BF16 if bf16 else LOSS_RTOL_FP32)
    got, want = policy_state(run_dir), policy_state(baseline)
    assert max_weight_diff(want, initial) > 10 * WEIGHT_ATOL  # the weights did move
    if bf16:
        # bf16 rounding flips Adam's update for a few near-zero gradients (each then off by up to
        # 2 lr), so compare on average: within 10% of how far training moved the weights.
        diff = mean_abs_diff(got, want) / mean_abs_diff(want, initial)
        assert diff <= 0.1, f"final weights differ by {diff:.1%} of the training update"
    else:
        diff = max_weight_diff(got, want)
        assert diff <= WEIGHT_ATOL, f"final weights differ by {diff:.2e}"
    print(f"{run_dir.name}: max relative loss difference {loss_diff:.2e}, "
          f"{'relative mean' if bf16 else 'max'} weight difference {diff:.2e}")
    # A full, unprefixed state dict that loads into a plain model, as does the Hugging Face copy.
    import transformers
    import utils
    config = compose([])
    plain = utils.build_model(None, dict(config.model.from_config), tokenizer, torch.float32)
    plain.load_state_dict(got, strict=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "LATEST")
    ids = torch.tensor([tokenizer.encode("\n\nHuman: sort c a b\n\nAssistant: a b c")])
    assert torch.allclose(plain(ids).logits, hf(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_fsdp_matches_basic_trainer_and_resumes(baseline, initial_weights, tokenizer, tmp_path):
    run_dir = tmp_path / "fsdp"
    train_2proc("FSDPTrainer", run_dir, "activation_checkpointing=true")
    check_against_baseline(run_dir, baseline, initial_weights, tokenizer)
    # Resume from the step-16 checkpoint: the same last two steps and the same final weights.
    shutil.rmtree(run_dir / "LATEST")
    output = train_2proc("FSDPTrainer", run_dir, "activation_checkpointing=true")
    assert "resuming from" in output and "step-16" in output
    check_against_baseline(run_dir, baseline, initial_weights, tokenizer)


@pytest.mark.slow
def test_two_nodes_started_as_two_commands_end_at_basic_trainers_weights(baseline, initial_weights,
                                                                          tokenizer, tmp_path):
    """The multi-node launch as written in docs/distributed.md, one torchrun command per node with a
    c10d rendezvous, here two "nodes" of one process each on 127.0.0.1 sharing one run directory:
    the same losses and weights as one process, and only global rank 0 writes the run's files."""
    import train
    endpoint = f"127.0.0.1:{train.free_port()}"
    run_dir = tmp_path / "two-nodes"
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                 "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "train.py",
                 *COMMON, "trainer=FSDPTrainer", f"local_run_dir={run_dir}"] for node in (1, 0)]
    env = launch_env()
    logs = [tmp_path / f"node{node}.txt" for node in (1, 0)]
    with contextlib.ExitStack() as files:
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=files.enter_context(log.open("w")),
                                  stderr=subprocess.STDOUT, start_new_session=True)
                 for cmd, log in zip(commands, logs)]
        try:
            codes = [proc.wait(timeout=RUN_TIMEOUT) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    check_against_baseline(run_dir, baseline, initial_weights, tokenizer)
    # global rank 0 (on whichever node joined the rendezvous first) wrote the run's files, once
    assert sorted("saved checkpoint" in log.read_text() for log in logs) == [False, True]


@pytest.mark.slow
def test_checkpoints_reshard_to_another_process_count_and_trainer(baseline, initial_weights, tokenizer,
                                                                 tmp_path):
    """A run stopped at its step-16 checkpoint resumes under another number of processes or another
    trainer and ends where one uninterrupted process ends: a sharded checkpoint of 4 FSDP processes
    under 2 (torch.distributed.checkpoint reshards it), and BasicTrainer's full checkpoint under 2
    FSDP processes. (FSDP 2 -> BasicTrainer: test_a_finished_sharded_fsdp_run_trains_further_...)"""
    one_micro_batch = ["gradient_accumulation_steps=1"]  # 8 = 4 x 2 = 2 x 4: one global batch
    four = tmp_path / "fsdp4"
    rc, output = torchrun(["train.py", *COMMON, *one_micro_batch, "trainer=FSDPTrainer",
                           "checkpoint_format=sharded", f"local_run_dir={four}"], tmp_path, nproc=4)
    assert rc == 0, output[-3000:]
    basic = run_in_process([*COMMON, *one_micro_batch, "save_hf_format=false", f"local_run_dir={tmp_path / 'basic'}"])
    for run_dir in (four, basic):
        shutil.rmtree(run_dir / "LATEST")  # as if stopped right after step-16
        # the resumed run saves full checkpoints (a relaunch may change the format), to compare
        output = train_2proc("FSDPTrainer", run_dir, *one_micro_batch, "checkpoint_format=full")
        assert "resuming from" in output and "step-16" in output
        check_against_baseline(run_dir, baseline, initial_weights, tokenizer)


@pytest.mark.slow
def test_torchrun_restarts_a_group_that_lost_a_rank_and_it_ends_bitwise(tmp_path):
    """`torchrun --max-restarts=1`: one of two FSDP processes is killed (SIGKILL) right after the
    step-32 checkpoint; torchrun restarts the group, which resumes from that checkpoint and ends
    with the same weights and losses, bit for bit, as an uninterrupted run."""
    import time
    import psutil
    args = [*COMMON, "n_examples=64", "save_hf_format=false", "trainer=FSDPTrainer"]
    whole = tmp_path / "whole"
    rc, output = torchrun(["train.py", *args, f"local_run_dir={whole}"], tmp_path)
    assert rc == 0, output[-3000:]
    run_dir = tmp_path / "restarted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "train.py", *args, f"local_run_dir={run_dir}"]
    env = launch_env()
    with open(tmp_path / "restarted.txt", "w") as log:
        agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.time() + RUN_TIMEOUT
            while not (run_dir / "step-32" / "trainer_state.pt").exists():
                assert agent.poll() is None and time.time() < deadline, "the run ended before step-32"
                time.sleep(0.05)
            psutil.Process(agent.pid).children()[-1].kill()  # one rank, SIGKILL
            assert agent.wait(timeout=RUN_TIMEOUT) == 0, (tmp_path / "restarted.txt").read_text()[-3000:]
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    assert "resuming from" in (tmp_path / "restarted.txt").read_text()
    a, b = policy_state(whole), policy_state(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert column(run_dir, "loss/train") == column(whole, "loss/train")


@pytest.mark.slow
def test_hsdp_on_four_processes_equals_basic_trainer(baseline, initial_weights, tokenizer, tmp_path):
    """fsdp_replicate=2 on 4 processes: two replicas, each block sharded over 2 processes (a 2D
    device mesh), the same losses and weights as one process."""
    run_dir = tmp_path / "hsdp"
    rc, output = torchrun(["train.py", *COMMON, "gradient_accumulation_steps=1", "trainer=FSDPTrainer",
                           "fsdp_replicate=2", f"local_run_dir={run_dir}"], tmp_path, nproc=4)
    assert rc == 0, output[-3000:]
    assert "HSDP: 2 replicas x 2 shards" in output
    check_against_baseline(run_dir, baseline, initial_weights, tokenizer)


def test_hsdp_settings_are_checked():
    import train
    from utils import ConfigError
    for overrides, processes in ((["fsdp_replicate=2"], 1), (["trainer=FSDPTrainer", "fsdp_replicate=3"], 4),
                                 (["fsdp_replicate=0"], 1)):
        with pytest.raises(ConfigError, match="fsdp_replicate=") as error:
            train.validate_config(compose([*COMMON, "batch_size=24", *overrides]), processes)
        assert "\n" not in str(error.value)
    train.validate_config(compose([*COMMON, "trainer=FSDPTrainer", "fsdp_replicate=2"]), 4)


@pytest.mark.slow
def test_tensor_parallel_matches_basic_trainer_and_resumes_its_checkpoint(
        baseline, initial_weights, tokenizer, tmp_path):
    run_dir = tmp_path / "tp"
    train_2proc("TensorParallelTrainer", run_dir)
    check_against_baseline(run_dir, baseline, initial_weights, tokenizer)
    # Checkpoints are interchangeable: resuming BasicTrainer's step-16 checkpoint (optimizer
    # state included) under tensor parallelism ends where BasicTrainer ended.
    resumed = tmp_path / "tp-from-basic"
    output = train_2proc("TensorParallelTrainer", resumed, f"resume_from={baseline}/step-16")
    assert "resuming from" in output
    assert max_weight_diff(policy_state(resumed), policy_state(baseline)) <= WEIGHT_ATOL
    assert column(resumed, "loss/train") == pytest.approx(column(baseline, "loss/train")[2:],
                                                          rel=LOSS_RTOL_FP32)


@pytest.mark.slow
def test_single_command_launch_with_bf16_mixed_precision_and_sampling(
        baseline, initial_weights, tokenizer, tmp_path):
    """`python train.py trainer=FSDPTrainer` with several GPUs and no torchrun starts one process
    per GPU itself (here two GPUs are faked in the launching process; the workers use gloo), run
    as the DPO repository ran it: bf16 mixed precision, sampling during evaluation."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch\n"
        "import train\n"
        "if __name__ == '__main__':\n"
        "    torch.cuda.device_count = lambda: 2\n"
        "    train.command_line()\n")
    run_dir = tmp_path / "spawned"
    rc, output = run_killable([sys.executable, str(launcher), *COMMON, "trainer=FSDPTrainer",
                               "model.fsdp_policy_mp=bfloat16", "sample_during_eval=true",
                               "n_eval_model_samples=2", f"local_run_dir={run_dir}"], tmp_path)
    assert rc == 0, output[-4000:]
    assert "starting 2 processes" in output
    # bf16 compute against the fp32 BasicTrainer run: the loss within 5e-3, the weights close.
    check_against_baseline(run_dir, baseline, initial_weights, tokenizer, bf16=True)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6  # 3 evaluations x 2 prompts, written once (by rank 0)
    assert all(isinstance(s["policy"], str) and isinstance(s["reference"], str) for s in samples)
    # A bad config is refused once, before any process starts, with the usual exit code.
    rc, output = run_killable([sys.executable, str(launcher), *COMMON, "trainer=FSDPTrainer",
                               "batch_size=6", f"local_run_dir={tmp_path}/bad"], tmp_path)
    assert rc == 2 and "batch_size=6 must be divisible" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_one_process_without_torchrun(baseline, tmp_path):
    """With no torchrun and at most one device, the trainers run as world size 1."""
    for trainer in ("FSDPTrainer", "TensorParallelTrainer"):
        run_dir = tmp_path / trainer
        result = run_subprocess([*COMMON, f"trainer={trainer}", "n_examples=16", f"local_run_dir={run_dir}"],
                                timeout=RUN_TIMEOUT)
        assert result.returncode == 0, result.stderr[-4000:]
        assert column(run_dir, "loss/train") == pytest.approx(column(baseline, "loss/train")[:2],
                                                              rel=LOSS_RTOL_FP32)


# A worker run under torchrun: each architecture's tensor-parallel plan and FSDP sharding against
# the plain model, on random tiny configs (Llama with grouped key/value heads, GPT-NeoX with
# partial rotary, GPT-2 with its fused Conv1D query/key/value).
ARCH_WORKER = r"""
import copy, datetime, json, sys
sys.path.insert(0, ROOT)
import torch, torch.distributed as dist, transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
import logps, packing, parallel

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
ARCHS = {
    "llama": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False), "LlamaDecoderLayer"),
    "gpt_neox": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, partial_rotary_factor=0.5), "GPTNeoXLayer"),
    "gpt2": (dict(n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0), "GPT2Block"),
}
# The output layer weight must reach the log-prob kernel whole, never as a DTensor shard.
kernel = logps.TokenLogpFunction.forward
def checked_kernel(ctx, rows, weight, *args, **kwargs):
    assert not isinstance(weight, DTensor) and weight.shape[0] == 128, type(weight)
    return kernel(ctx, rows, weight, *args, **kwargs)
logps.TokenLogpFunction.forward = staticmethod(checked_kernel)
def sequence_logps(model, ids, mask, labels, average, chunk_size):
    layout = packing.plain_layout({"chosen_input_ids": ids, "chosen_attention_mask": mask,
                                   "chosen_labels": labels}, "chosen")
    return packing.model_logps(model, layout, average, chunk_size)["chosen"].logps

def grads(model, ref):
    worst = 0.0
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        g = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        worst = max(worst, (p.grad - parallel.unfuse_columns(model, name, g)).abs().max().item())
    return worst

report = {}
for arch, (settings, block) in ARCHS.items():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(arch, vocab_size=128, **settings)
    ref = transformers.AutoModelForCausalLM.from_config(config)
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(1, 128, (4, 12))
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, :4] = -100
    full = sequence_logps(ref, ids, mask, labels, False, 1024)
    full.mean().backward()
    out = {}

    tp = parallel.tensor_parallelize(copy.deepcopy(ref), mesh, block)
    got = sequence_logps(tp, ids, mask, labels, False, 1024)
    got.mean().backward()
    out["tp_logps"] = (got - full).abs().max().item()
    out["tp_grads"] = grads(tp, ref)
    state = parallel.get_model_state_dict(tp, options=parallel.FULL_STATE_SAVE)
    if rank == 0:
        state = {k: parallel.unfuse_columns(tp, k, v) for k, v in state.items()}
        out["tp_state"] = max((v - state[k]).abs().max().item()
                              for k, v in ref.state_dict().items())
    moved = {k: v + 0.01 * torch.randn_like(v) for k, v in ref.state_dict().items()}
    fused = {k: parallel.fuse_columns(tp, k, v) for k, v in moved.items()}
    parallel.set_model_state_dict(tp, fused, options=parallel.FULL_STATE_LOAD)
    plain = copy.deepcopy(ref)
    plain.load_state_dict(moved)
    with torch.no_grad():
        out["tp_reloaded"] = (tp(ids).logits - plain(ids).logits).abs().max().item()
        with parallel.seeded_rng(1, torch.device("cpu")):
            sampled = tp.generate(ids[:, :4], max_new_tokens=6, do_sample=True, pad_token_id=0)
        greedy = tp.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
        greedy_plain = plain.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sampled.tolist())
    out["tp_same_samples_on_ranks"] = all(s == every[0] for s in every)
    out["tp_greedy_as_plain"] = torch.equal(greedy, greedy_plain)

    for p in ref.parameters():
        p.grad = None
    full = sequence_logps(ref, ids, mask, labels, False, 1024)
    full.mean().backward()
    fsdp = parallel.fsdp_shard(copy.deepcopy(ref), mesh, block, {})
    rows = slice(2 * rank, 2 * rank + 2)
    got = fsdp.run_in_forward(sequence_logps, fsdp, ids[rows], mask[rows], labels[rows],
                              False, 1024)
    got.mean().backward()
    out["fsdp_logps"] = (got - full[rows]).abs().max().item()
    out["fsdp_grads"] = grads(fsdp, ref)
    report[arch] = out
if rank == 0:
    print("REPORT " + json.dumps(report), flush=True)
# Both ranks done before teardown; then skip interpreter shutdown, whose C++ static destructors
# can abort ("terminate called without an active exception") after all results are in.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
import os
os._exit(0)
"""


@pytest.mark.slow
def test_parallel_plans_match_plain_models_for_llama_neox_gpt2(tmp_path):
    worker = tmp_path / "arch_worker.py"
    worker.write_text(f"ROOT = {str(ROOT)!r}\n" + ARCH_WORKER)
    rc, output = torchrun([str(worker)], tmp_path, timeout=180)
    assert rc == 0, output[-4000:]
    report = json.loads(output.split("REPORT ", 1)[1].splitlines()[0])
    for arch, out in report.items():
        for key in ("tp_logps", "tp_grads", "tp_state", "tp_reloaded", "fsdp_logps", "fsdp_grads"):
            assert out[key] < 1e-5, (arch, key, out[key])
        assert out["tp_same_samples_on_ranks"] and out["tp_greedy_as_plain"], (arch, out)


# ----------------------------------------------------------------------------- single process

def test_tensor_parallel_does_not_split_the_batch():
    """Validation counts data-parallel processes: each tensor-parallel rank sees the whole batch."""
    import train
    from omegaconf import OmegaConf
    config = compose([*COMMON, "batch_size=6", "gradient_accumulation_steps=2",
                      "eval_batch_size=3", "local_run_dir=/tmp/unused"])
    OmegaConf.resolve(config)
    config.trainer = "TensorParallelTrainer"
    train.validate_config(config, world_size=2)
    config.trainer = "FSDPTrainer"
    with pytest.raises(train.ConfigError, match="batch_size=6 must be divisible"):
        train.validate_config(config, world_size=2)


def test_block_plans_cover_llama_neox_and_gpt2():
    import transformers
    import parallel
    plans = {t: parallel.block_tp_plan(transformers.AutoConfig.for_model(t)) for t in ("llama", "gpt_neox", "gpt2")}
    assert plans["llama"] == {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise",
                              "self_attn.v_proj": "colwise", "self_attn.o_proj": "rowwise",
                              "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
                              "mlp.down_proj": "rowwise"}
    assert set(plans["gpt_neox"].values()) == {"colwise", "rowwise"}
    assert plans["gpt2"]["attn.c_attn"] == "colwise_qkv"
    unknown = types.SimpleNamespace(model_type="mystery", base_model_tp_plan=None)
    with pytest.raises(parallel.ConfigError, match="no tensor-parallel plan"):
        parallel.block_tp_plan(unknown)


def test_fused_column_order_groups_each_ranks_heads_and_inverts():
    import parallel
    order = parallel.fused_column_order(12, parts=3, tp=2)  # q, k, v of 4 columns each
    assert order.tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    assert torch.equal(order[torch.argsort(order)], torch.arange(12))


def test_mixed_clip_matches_clip_grad_norm_on_plain_tensors():
    import parallel
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(a, 0.5).item()
    got = parallel.clip_grad_norm_mixed(b, 0.5)
    assert got == pytest.approx(want, rel=1e-6)
    for p, q in zip(a, b):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)


def test_unknown_block_name_is_a_config_error():
    import transformers
    import parallel
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=64))
    assert len(parallel.find_blocks(model, "LlamaDecoderLayer")) == 1
    with pytest.raises(parallel.ConfigError, match="candidates: LlamaDecoderLayer"):
        parallel.find_blocks(model, "GPT2Block")


# beta-DPO, and losses that need the whole batch (AOT's sort, the sft term's token mean, WPO and
# LD-DPO's parts): 2-process FSDP must train what one process trains on the same global batches.
GLOBAL_LOSSES = {
    "beta_dpo": ["loss.mode_loss=beta_DPO", "loss.mode_weight=0.5", "loss.a=0.6"],
    "mpo_wpo_ld": ["loss=mix", "loss.use_weighting=true", "loss.ld_alpha=0.5"],
    "aot_rpo": ["loss=aot", "loss.rpo_alpha=0.5"],
    # KTO's KL estimate: the mean over the micro-batch's mismatched pairs, gathered over processes
    "kto": ["loss=kto", "loss.desirable_weight=1.2"],
    # TDPO's token-level KL, from packed rows (each prompt once; the defaults, named here)
    "tdpo_packed": ["loss=tdpo", "share_prompt=true", "packing=true"],
    # reference-free: the NLL term and the odds ratio, no reference model on any rank
    "orpo": ["loss=orpo"],
}


@pytest.mark.slow
@pytest.mark.parametrize("which", list(GLOBAL_LOSSES))
def test_fsdp_equals_basic_for_losses_over_the_global_batch(which, tokenizer, tmp_path):
    extra = GLOBAL_LOSSES[which]
    basic = run_in_process([*COMMON, *extra, f"local_run_dir={tmp_path}/basic"])
    run_dir = tmp_path / "fsdp"
    train_2proc("FSDPTrainer", run_dir, *extra)
    assert_same_losses(run_dir, basic, LOSS_RTOL_FP32)
    assert max_weight_diff(policy_state(run_dir), policy_state(basic)) <= WEIGHT_ATOL
    if which == "kto":
        assert column(run_dir, "kto_train/kl") == pytest.approx(column(basic, "kto_train/kl"), rel=1e-4, abs=1e-6)
        assert max(column(basic, "kto_train/kl")) > 0  # the estimate is not the clamp's 0 throughout
    if which == "beta_dpo":
        # the selection and its running statistics are the global batch's, on every process
        for key in ("record_train/mask_count", "record_train/gap_mean", "record_train/beta_used"):
            # (the gaps are float32 log-ratios of weights equal to ~1e-6: equal to ~1e-6 too)
            assert column(run_dir, key) == pytest.approx(column(basic, key), rel=1e-4, abs=1e-6), key
        # and resume restores them: the last two steps again from the step-16 checkpoint
        shutil.rmtree(run_dir / "LATEST")
        output = train_2proc("FSDPTrainer", run_dir, *extra)
        assert "resuming from" in output
        assert max_weight_diff(policy_state(run_dir), policy_state(basic)) <= WEIGHT_ATOL


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_resume_exactly(tmp_path):
    """checkpoint_format=sharded: each of 2 processes writes its own shard; a relaunch from the
    step-16 shards ends bit for bit where the undisturbed run ended."""
    import checkpoints
    whole = tmp_path / "sharded"
    train_2proc("FSDPTrainer", whole, "checkpoint_format=sharded")
    assert sorted(p.name for p in (whole / "step-16" / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "LATEST")
    output = train_2proc("FSDPTrainer", resumed, "checkpoint_format=sharded")
    assert f"resuming from {resumed / 'step-16'} at 16 examples" in output
    a, b = (checkpoints.load_policy_state(run / "LATEST") for run in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_finished_sharded_fsdp_run_trains_further_under_fsdp_and_basic_trainer(baseline,
                                                                                 tmp_path):
    """Issue 28: a finished 16-example FSDP run (sharded checkpoints), relaunched with
    n_examples=32 under FSDP and, a copy of it, under BasicTrainer, ends where the uninterrupted
    32-example BasicTrainer run ends (FSDP sums gradients in another order: 1e-5)."""
    import checkpoints
    run_dir = tmp_path / "fsdp"
    train_2proc("FSDPTrainer", run_dir, "checkpoint_format=sharded", "n_examples=16")  # last wins
    copy = tmp_path / "basic"
    shutil.copytree(run_dir, copy)
    output = train_2proc("FSDPTrainer", run_dir, "checkpoint_format=sharded")
    assert f"resuming from {run_dir / 'LATEST'} at 16 examples" in output
    run_in_process([*COMMON, f"local_run_dir={copy}"])  # BasicTrainer writes full checkpoints
    for extended in (run_dir, copy):
        assert_same_losses(extended, baseline, LOSS_RTOL_FP32)
        got = checkpoints.load_policy_state(extended / "LATEST")
        assert max_weight_diff(got, policy_state(baseline)) <= 1e-5


# ----------------------------------------------------------------------------- FSDP start-up memory
# A worker run under torchrun: train.build_models under FSDP with 2 processes builds the weights on
# rank 0 only (rank 1 builds on the meta device); sharding then gives rank 1 its shards of rank
# 0's weights and rank 0's non-persistent buffers (the rotary tables, in no state dict).
META_WORKER = r"""
import datetime, json, os, sys
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from omegaconf import OmegaConf
from conftest import compose
import parallel, ref_cache, references, train, utils

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
config = compose(OVERRIDES)
OmegaConf.resolve(config)
policy, reference = train.build_models(config, utils.build_tokenizer("embedded"))
out = {"meta": [all(p.is_meta for p in m.parameters()) for m in (policy, reference)],
       "fingerprint": parallel.rank0_value(ref_cache.weights_hash, reference),
       "rng": torch.rand(3).tolist()}
built = {k: v.clone() for k, v in policy.state_dict().items()} if rank == 0 else {}
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
policy = parallel.fsdp_shard(policy, mesh, config.model.block_name, {}, from_rank0=True)
state = parallel.full_model_state(policy)  # gathered from both ranks' shards
if rank == 0:
    out["weights"] = max((state[k] - v).abs().max().item() for k, v in built.items())
out["buffers"] = {name: b.tolist() for name, b in policy.named_buffers()}


def after_forward():  # which parameters a forward leaves gathered (plain tensors, not shards)
    with torch.no_grad():
        policy(input_ids=torch.tensor([[1, 2, 3]]))
    return [not isinstance(p, DTensor) for p in policy.parameters()]


out["usual"] = after_forward()
with parallel.gathered_for_generation(policy) as gathered:
    out["gathered"] = [gathered, after_forward()]
out["after"] = after_forward()
policy.reshard()
every = [None] * dist.get_world_size()
dist.all_gather_object(every, out)
if rank == 0:
    print("REPORT " + json.dumps(every), flush=True)
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # skip interpreter shutdown (see ARCH_WORKER)
"""


@pytest.mark.slow
def test_fsdp_builds_weights_on_rank0_only(tmp_path):
    worker = tmp_path / "meta_worker.py"
    overrides = [*COMMON, "trainer=FSDPTrainer", f"local_run_dir={tmp_path}/run"]
    worker.write_text(f"ROOT = {str(ROOT)!r}\nOVERRIDES = {overrides!r}\n" + META_WORKER)
    rc, output = torchrun([str(worker)], tmp_path, timeout=180)
    assert rc == 0, output[-4000:]
    first, second = json.loads(output.split("REPORT ", 1)[1].splitlines()[0])
    assert first["meta"] == [False, False] and second["meta"] == [True, True]
    # the reference cache key is rank 0's hash of the weights, on both ranks
    assert first["fingerprint"] == second["fingerprint"] and len(first["fingerprint"]) == 32
    assert first["rng"] == second["rng"]  # rank 1 continues from rank 0's RNG state
    assert first["weights"] == 0.0
    assert "model.rotary_emb.inv_freq" in second["buffers"]
    assert first["buffers"] == second["buffers"]
    # gather_for_generation: every parameter stays gathered across forwards inside, and afterwards
    # a forward leaves the blocks sharded and the root gathered again, as before
    for report in (first, second):
        usual = report["usual"]
        assert any(usual) and not all(usual)  # the root's parameters kept, the blocks' freed
        assert report["gathered"] == [True, [True] * len(usual)]
        assert report["after"] == usual


@pytest.mark.slow
def test_fsdp_bad_archive_is_refused_on_every_rank(tmp_path):
    """Rank 0 alone loads and checks model.archive; the other ranks get its one-line refusal
    instead of waiting for weights that never come."""
    archive = tmp_path / "policy.pt"
    torch.save({"state": {"not.a.weight": torch.zeros(2)}}, archive)
    rc, output = torchrun(["train.py", *COMMON, "trainer=FSDPTrainer", f"model.archive={archive}",
                           f"local_run_dir={tmp_path}/run"], tmp_path, timeout=120)
    assert rc != 0
    # each rank writes its refusal in one write; count them, as the two may share a line
    assert output.count("error: model.archive=") == 2, output[-3000:]
    assert "does not fit the model" in output
    assert not (tmp_path / "run").exists()
