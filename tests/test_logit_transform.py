"""Models whose head is more than hidden @ weight (issue 11 item 9): Gemma-2's soft-capped logits,
Cohere's logit scale, and any other head, which the start-up check sends to the full-logits path
with one warning line. Log-probs must equal those of the model's own forward."""
import copy

import torch

import logps
import packing
import trainers
from conftest import FAST, compose, usual_logps, usual_token_kl

TOL = 1e-5


def tiny_batch(vocab, seed=0, batch=3, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[1, -2:] = -100  # a shorter completion
    return ids, mask, labels


def gemma2(cap=2.0):
    """A float32 Gemma-2 with a cap small enough that soft-capping changes every log-prob."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       final_logit_softcapping=cap, initializer_range=0.3,
                       attn_implementation="eager")
    return Gemma2ForCausalLM._from_config(cfg, dtype=torch.float32).eval()


def perturbed(model, scale=0.02, seed=1):
    """A copy with slightly different weights (a policy that has moved from its reference)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


class LiveReference:
    """The part of references.ModelReference token_level_logps uses."""

    def __init__(self, model):
        self.model = model

    def layout_states(self, layout, full):
        return packing.model_states(self.model, layout, full)

    def output_layer(self):
        return logps.output_layer(self.model)


def test_gemma2_softcap_changes_logps_and_dpo_logps_equal_the_models_own():
    model = gemma2()
    ids, mask, labels = tiny_batch(64)
    own = logps.get_batch_logps(model(input_ids=ids, attention_mask=mask).logits.float(), labels)
    plain_head = logps.completion_logps(model.model(input_ids=ids, attention_mask=mask)
                                        .last_hidden_state, model.lm_head.weight, labels)
    assert (plain_head - own).abs().max() > 0.1  # the cap matters in this test
    got = usual_logps(model, ids, mask, labels, False, 4)
    torch.testing.assert_close(got, own, rtol=0, atol=TOL)


def test_gemma2_softcap_tdpo_equals_the_models_own_logits():
    reference = gemma2()
    policy = perturbed(reference)
    ids, mask, labels = tiny_batch(64, seed=2)
    for average in (False, True):
        want = logps.tdpo_get_batch_logps(policy(input_ids=ids, attention_mask=mask).logits.float(),
                                          reference(input_ids=ids, attention_mask=mask).logits.float(),
                                          labels, average)
        got = usual_token_kl(policy, LiveReference(reference), ids, mask, labels,
                                      average, 4)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=TOL)
    # and the policy's gradient flows through its own forward
    margin, kl, _ = usual_token_kl(policy, LiveReference(reference), ids, mask, labels,
                                            False, 4)
    (margin.sum() - kl.sum()).backward()
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().sum() > 0


def test_cohere_logit_scale_is_applied_in_the_chunked_path():
    from transformers import CohereConfig, CohereForCausalLM
    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, logit_scale=4.0)
    reference = CohereForCausalLM._from_config(cfg, dtype=torch.float32).eval()
    policy = perturbed(reference)
    assert not logps.has_logit_transform(policy)  # chunked, with the scale folded in
    ids, mask, labels = tiny_batch(64, seed=3)
    own = policy(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(usual_logps(policy, ids, mask, labels, True, 4),
                               logps.get_batch_logps(own, labels, True), rtol=0, atol=TOL)
    ref_own = reference(input_ids=ids, attention_mask=mask).logits.float()
    want = logps.tdpo_get_batch_logps(own, ref_own, labels)
    got = usual_token_kl(policy, LiveReference(reference), ids, mask, labels, False, 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=TOL)


class HalvedTemperatureHead(torch.nn.Linear):
    """A head that is not a plain linear layer: its logits are divided by a temperature."""

    def forward(self, x):
        return super().forward(x) / 0.5


def test_a_custom_head_falls_back_to_full_logits_with_one_warning(tmp_path, tokenizer, capsys):
    import train
    config = compose([*FAST, "loss=dpo", "loss.beta=0.1", f"local_run_dir={tmp_path}/run"])
    policy, reference = train.build_models(config, tokenizer)
    for model in (policy, reference):
        old = model.get_output_embeddings()
        head = HalvedTemperatureHead(old.in_features, old.out_features, bias=False)
        head.weight = old.weight  # still tied to the embeddings
        model.set_output_embeddings(head)
    capsys.readouterr()
    trainer = trainers.BasicTrainer(policy, config, seed=0, run_dir=str(tmp_path / "run"),
                                    reference_model=reference, tokenizer=tokenizer)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1
    assert lines[0].startswith("warning: the policy and the reference model's output layer is not "
                               "a plain linear layer")
    assert "scoring from full logits instead" in lines[0]
    batch = trainer.rank_slice(trainer.eval_batches[0], 0, 1)
    ids, mask, labels = (batch[f"rejected_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    own = logps.get_batch_logps(policy(input_ids=ids, attention_mask=mask).logits.float(), labels)
    torch.testing.assert_close(usual_logps(policy, ids, mask, labels, False, 8), own,
                               rtol=0, atol=TOL)
    ref_want = logps.get_batch_logps(reference(input_ids=ids, attention_mask=mask).logits.float(),
                                     labels)
    torch.testing.assert_close(trainer.reference.sequence_logps(batch, "rejected", False),
                               ref_want, rtol=0, atol=TOL)


def test_a_plain_head_passes_the_check_silently(tmp_path, tokenizer, capsys):
    import train
    config = compose([*FAST, "loss=tdpo", "loss.beta=0.1", f"local_run_dir={tmp_path}/run"])
    policy, reference = train.build_models(config, tokenizer)
    capsys.readouterr()
    trainers.BasicTrainer(policy, config, seed=0, run_dir=str(tmp_path / "run"),
                          reference_model=reference, tokenizer=tokenizer)
    assert "warning" not in capsys.readouterr().out
    assert not logps.has_logit_transform(policy) and not logps.has_logit_transform(reference)
