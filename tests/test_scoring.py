"""scoring.py: one path from a batch to the loss's log-probs (issue 22). Every layout (the usual
one per side, shared prompts, packed rows) goes through packing.model_logps / packing.token_kl,
whose results equal the full-logits formulas of logps.py; and the path from train_step to the
chunked kernel is short enough to read in one sitting."""
import json
import operator
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import logps
import packing
import references
import scoring
import trainers
from conftest import FAST, ROOT, compose

SIDES = ("chosen", "rejected")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            attn_implementation="eager")
    return tf.LlamaForCausalLM(config).double().eval()


def pair_batch():
    """Two pairs: prompts of 3 and 2 tokens, responses of uneven length, right padded."""
    prompts, answers = [[5, 6, 7], [8, 9]], {"chosen": [[10, 11], [12, 13, 14, 15]],
                                             "rejected": [[16, 17, 18], [19]]}
    batch = {"prompt_attention_mask": torch.nn.utils.rnn.pad_sequence(
        [torch.ones(len(p), dtype=torch.long) for p in prompts], batch_first=True)}
    for side in SIDES:
        seqs = [torch.tensor(p + a) for p, a in zip(prompts, answers[side])]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        labels = ids.masked_fill(mask == 0, logps.IGNORE_INDEX)
        for b, p in enumerate(prompts):
            labels[b, :len(p)] = logps.IGNORE_INDEX
        batch.update({f"{side}_input_ids": ids,
                      f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


LAYOUTS = {"usual": (False, False), "shared": (True, False), "packed": (False, True),
           "shared_packed": (True, True)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_equals_full_logits_in_float64(name):
    """packing.model_logps on each layout = get_batch_logps of the model's own full logits, per
    side, to float64 rounding (1e-10: far above it, far below any real difference)."""
    model, batch = tiny_model(), pair_batch()
    layouts = packing.lay_out(batch, SIDES, *LAYOUTS[name], None)
    assert len(layouts) == (2 if name == "usual" else 1)
    with torch.no_grad():
        for average in (False, True):
            got = {}
            for layout in layouts:
                got.update({s: v.logps for s, v in packing.model_logps(model, layout, average,
                                                                        3).items()})
            for side in SIDES:
                ids, mask, labels = (batch[f"{side}_{k}"] for k in
                                     ("input_ids", "attention_mask", "labels"))
                want = logps.get_batch_logps(model(input_ids=ids, attention_mask=mask).logits,
                                             labels, average)
                torch.testing.assert_close(got[side], want, rtol=0, atol=1e-10)


def test_usual_layout_is_the_batch_itself():
    """The usual layout runs each side's own (B, T) rows with its 2D mask and no position ids."""
    batch = pair_batch()
    layout = packing.plain_layout(batch, "rejected")
    kwargs = layout.forward_kwargs(None)
    assert kwargs.keys() == {"input_ids", "attention_mask"}
    assert kwargs["input_ids"] is batch["rejected_input_ids"]
    assert kwargs["attention_mask"] is batch["rejected_attention_mask"]
    assert layout.selections["rejected"].counts.tolist() == [3, 1]
    assert layout.padding_fraction == pytest.approx(1 - 9 / 12)  # rows of 6 and 3 tokens


def test_token_kl_on_every_layout_equals_tdpo_full_logits():
    policy, reference = tiny_model(0), references.ModelReference(tiny_model(1), 3)
    batch = pair_batch()
    for setting in LAYOUTS.values():
        for layout in packing.lay_out(batch, SIDES, *setting, None):
            with torch.no_grad():
                got = packing.token_kl(policy, reference, layout, False, 3)
            for side, values in got.items():
                ids, mask, labels = (batch[f"{side}_{k}"] for k in
                                     ("input_ids", "attention_mask", "labels"))
                want = logps.tdpo_get_batch_logps(policy(input_ids=ids, attention_mask=mask).logits,
                                                  reference.model(input_ids=ids,
                                                                  attention_mask=mask).logits,
                                                  labels)
                for g, w in zip(values, want):
                    torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_batch_logps_gives_the_loss_its_inputs():
    """DPO's inputs from batch_logps: policy and reference per side, and the token counts."""
    policy, reference = tiny_model(0), references.ModelReference(tiny_model(1), 3)
    batch = pair_batch()
    import losses
    spec = losses.get_loss({"name": "dpo", "beta": 0.1})
    got = scoring.batch_logps(policy, reference, batch, packing.lay_out(batch, SIDES, False, False,
                                                                        None),
                              spec, {"beta": 0.1}, 3)
    assert isinstance(got, losses.BatchLogps) and got.public is None and got.chosen_kl is None
    assert got.chosen_tokens.tolist() == [2.0, 4.0]
    assert got.rejected_tokens.tolist() == [3.0, 1.0]
    torch.testing.assert_close(got.reference_chosen,
                               reference.sequence_logps(batch, "chosen", False))
    assert got.chosen.requires_grad and not got.reference_chosen.requires_grad
    assert set(got.tensors()) == {"chosen", "rejected", "reference_chosen", "reference_rejected",
                                  "chosen_tokens", "rejected_tokens"}


def project_frames_below(name: str):
    """The frames of this repository's files between the innermost call of `name` (excluded)
    and the caller of this function (included); None when `name` is not on the stack."""
    frame, found = sys._getframe(1), []
    while frame is not None and frame.f_code.co_name != name:
        if Path(frame.f_code.co_filename).resolve().parent == ROOT:
            found.append(f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}")
        frame = frame.f_back
    return None if frame is None else found[::-1]


def record_kernel_stacks(stacks: list, patch):
    """Make each chunked kernel's forward append the repository's frames below train_step to
    `stacks` (when a training step calls it: not the start-up checks, not evaluation);
    patch(kernel, name, value) sets the attribute (pytest's monkeypatch, or setattr)."""
    for kernel in (logps.TokenLogpFunction, logps.TokenKLFunction):
        def recorded(ctx, *args, forward=kernel.forward):
            stack = project_frames_below("train_step")
            if stack is not None:
                stacks.append(stack)
            return forward(ctx, *args)
        patch(kernel, "forward", staticmethod(recorded))


def assert_five_frames(stacks, token_level: bool):
    """The issue's measure: train_step, the frames below it and the kernel's forward, at most
    five; the policy's path (the reference's goes through its kind, references.layout_logps)."""
    policy = [stack for stack in stacks if not any(f.startswith("references.") for f in stack)]
    assert policy
    kernel = "packing.token_kl" if token_level else "packing.model_logps"
    for stack in policy:
        assert stack == ["trainers.batch_loss", "scoring.batch_logps", kernel], stack
        assert 1 + len(stack) + 1 <= 5  # train_step, these, the kernel's forward


# utils.call is operator.call, which adds no frame, from Python 3.11; on 3.10 a lambda stands in
FRAME_FREE_CALL = pytest.mark.skipif(not hasattr(operator, "call"), reason="Python 3.10: no operator.call")


@FRAME_FREE_CALL
@pytest.mark.parametrize("loss", [["loss=dpo", "loss.beta=0.1"], ["loss=tdpo", "loss.beta=0.1"]])
def test_train_step_reaches_the_kernel_in_five_frames(loss, tokenizer, tmp_path, monkeypatch):
    import train
    config = compose([*FAST, *loss, f"local_run_dir={tmp_path}/run"])
    policy, reference = train.build_models(config, tokenizer)
    trainer = trainers.BasicTrainer(policy, config, seed=0, run_dir=str(tmp_path / "run"),
                                    reference_model=reference, tokenizer=tokenizer)
    trainer.begin()
    stacks = []
    record_kernel_stacks(stacks, monkeypatch.setattr)
    trainer.train_step(next(iter(trainer.train_iterator())))
    assert_five_frames(stacks, "tdpo" in loss[0])


FSDP_FRAMES_WORKER = """
import json, sys
sys.path[:0] = [ROOT, ROOT + "/tests"]
from conftest import run_in_process
from test_scoring import record_kernel_stacks
stacks = []
record_kernel_stacks(stacks, setattr)
run_in_process(sys.argv[1:])
print("STACKS " + json.dumps(stacks))
"""


@FRAME_FREE_CALL
def test_under_fsdp_train_step_reaches_the_kernel_in_the_same_five_frames(tmp_path):
    """FSDPTrainer runs the scoring inside the policy's root forward (its registered
    run_in_forward, torch's hooks around utils.call): no frame of the repository's is added."""
    from conftest import run_subprocess
    worker = tmp_path / "worker.py"
    worker.write_text(f"ROOT = {str(ROOT)!r}\n" + FSDP_FRAMES_WORKER)
    result = run_subprocess([*FAST, "loss=dpo", "loss.beta=0.1", "trainer=FSDPTrainer", "n_examples=8",
                             "do_first_eval=false", f"local_run_dir={tmp_path}/run"], script=str(worker))
    assert result.returncode == 0, result.stderr[-3000:]
    stacks = json.loads(result.stdout.split("STACKS ")[-1])
    assert_five_frames(stacks, False)
