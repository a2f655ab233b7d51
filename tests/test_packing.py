"""Shared prompts and packed rows (packing.py, issue 18): the same log-probs and gradients as the
usual layout (one right-padded row per sequence) for every model family the trainer is used with,
the layout itself worked out by hand, the start-up fallback, and whole training runs."""
import json
import random
import shutil

import pytest
import torch
import transformers as tf
from omegaconf import OmegaConf
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import logps
import losses
import moe
import packing
import preference_datasets as pdx
import references
import scoring
from conftest import FAST, ROOT, read_metrics, run_in_process

VOCAB = 97
CHUNK = 5  # output-layer chunk: several chunks per batch
SIDES = ("chosen", "rejected")
# (prompt, chosen response, rejected response) lengths: uneven, one-token prompt and response
LENGTHS = [(3, 4, 2), (7, 1, 5), (1, 6, 6), (5, 3, 9), (2, 2, 1)]
# (share_prompt, packing, packing_row_tokens): a budget below every pair, and one that puts
# several segments in a row
SETTINGS = [(True, False, None), (False, True, None), (True, True, None), (True, True, 4),
            (True, True, 30), (False, True, 30)]


# ----------------------------------------------------------------------------- batches

def element(prompt, chosen, rejected, rejected_prompt=None):
    """One tokenised pair as preference_datasets.assemble lays it out (labels -100 on the prompt);
    `rejected_prompt` gives the rejected sequence other prompt tokens (of the same length)."""
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side, head, response in (("chosen", prompt, chosen),
                                 ("rejected", rejected_prompt or prompt, rejected)):
        out[f"{side}_input_ids"] = head + response
        out[f"{side}_attention_mask"] = [1] * (len(head) + len(response))
        out[f"{side}_labels"] = [-100] * len(head) + response
    return out


def random_ids(generator, n):
    return torch.randint(1, VOCAB, (n,), generator=generator).tolist()


def make_batch(lengths=LENGTHS, seed=0):
    """A collated micro-batch (right-padded, pad id 0 as preference_datasets.collate pads)."""
    g = torch.Generator().manual_seed(seed)
    return pdx.collate([element(*(random_ids(g, n) for n in triple)) for triple in lengths], 0)


# ----------------------------------------------------------------------------- models

def _config(family):
    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64)
    if family == "gpt2":  # learned absolute positions
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=1, eos_token_id=2)
    if family == "gemma2":  # soft-capped logits: scored from the model's full logits
        # large weights, so that the cap changes the logits
        return tf.Gemma2Config(head_dim=8, num_key_value_heads=1, final_logit_softcapping=2.0,
                               initializer_range=1.0, **small)
    if family == "mixtral":
        return tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                router_aux_loss_coef=0.01, **small)
    kinds = {"llama": tf.LlamaConfig, "gpt_neox": tf.GPTNeoXConfig, "mistral": tf.MistralConfig,
             "qwen2": tf.Qwen2Config}
    extra = {} if family == "gpt_neox" else {"num_key_value_heads": 2}
    return kinds[family](**small, **extra)


FAMILIES = ["llama", "gpt_neox", "gpt2", "mistral", "qwen2", "mixtral"]


def make_model(family, attention="sdpa", seed=0):
    config = _config(family)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()  # eval: no dropout
    assert model.config._attn_implementation == attention
    return model


def usual_logps(model, batch, average, sides=SIDES):
    return {side: packing.model_logps(model, packing.plain_layout(batch, side), average,
                                      CHUNK)[side].logps for side in sides}


def layout(batch, setting, sides=SIDES):
    return packing.build_layout(batch, sides, *setting)


def loss_config(name, **changes):
    args = OmegaConf.to_container(OmegaConf.load(ROOT / "config" / "loss" / f"{name}.yaml"))
    args.update(changes)
    return losses.get_loss(args), {k: v for k, v in args.items() if k != "name"}


# ----------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_logps_equal_the_usual_layout(family, attention):
    model, batch = make_model(family, attention), make_batch()
    with torch.no_grad():
        expected = {average: usual_logps(model, batch, average) for average in (False, True)}
        for setting in SETTINGS:
            lay = layout(batch, setting)
            hidden = packing.model_states(model, lay)
            for average in (False, True):
                got = packing.model_logps(model, lay, average, CHUNK, states=hidden)
                assert got.keys() == expected[average].keys()
                for side in SIDES:
                    torch.testing.assert_close(got[side].logps, expected[average][side], rtol=0,
                                               atol=1e-5, msg=f"{setting} average={average} {side}")


def scored(policy, reference, batch, name, args_changes, lay):
    """(the loss's log-probs dict, {parameter name: gradient of the loss}) on one layout."""
    spec, args = loss_config(name, **args_changes)
    sides = SIDES if spec.paired else ("chosen",)
    policy.zero_grad(set_to_none=True)
    layouts = [lay] if lay is not None else [packing.plain_layout(batch, s) for s in sides]
    found = scoring.batch_logps(policy, reference, batch, layouts, spec, args, CHUNK)
    loss, _ = spec.compute(found, args, spec.init_state(), gather=lambda t: t, train=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in found.tensors().items()}, grads


LOSSES = [("dpo", {"beta": 0.1}), ("ipo", {"beta": 0.1}), ("ipo", {"rpo_alpha": 1.0}),
          ("sft", {}), ("tdpo", {"beta": 0.1})]


def assert_same_gradients(family, attention, loss_list, settings):
    """For each loss: the scored values and the gradient of the loss w.r.t. every policy parameter
    on each layout equal those of the usual layout (the reference has other weights)."""
    policy = make_model(family, attention, seed=0)
    reference = references.ModelReference(make_model(family, attention, seed=1), CHUNK)
    batch = make_batch()
    for name, changes in loss_list:
        sides = ("chosen",) if name == "sft" else SIDES
        want, want_grads = scored(policy, reference, batch, name, changes, None)
        # nearly every parameter gets a gradient (not the MoE experts no token was routed to,
        # nor a key bias: softmax ignores what adds the same to every score of a query)
        nonzero = sum(bool(g.abs().sum() > 0) for g in want_grads.values())
        assert nonzero >= 0.75 * len(list(policy.parameters()))
        for setting in settings:
            got, got_grads = scored(policy, reference, batch, name, changes,
                                    layout(batch, setting, sides))
            where = f"{name} {changes} {setting}"
            assert got.keys() == want.keys(), where
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5,
                                           msg=f"{where} {key}")
            assert got_grads.keys() == want_grads.keys(), where
            for key in want_grads:
                torch.testing.assert_close(got_grads[key], want_grads[key], rtol=0, atol=1e-5,
                                           msg=f"{where} grad {key}")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_loss_gradients_equal_the_usual_layout(attention):
    """DPO, IPO (averaged log-probs; with RPO's NLL term, which reads the token counts), SFT and
    TDPO (per-position KL, margins and log-probs), every layout setting, on a Llama."""
    assert_same_gradients("llama", attention, LOSSES, SETTINGS)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_dpo_and_tdpo_gradients_equal_the_usual_layout_per_family(family, attention):
    assert_same_gradients(family, attention, [LOSSES[0], LOSSES[-1]], [(True, True, 30)])


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_every_loss_and_layout_gradient_per_family(family, attention):
    assert_same_gradients(family, attention, LOSSES, SETTINGS)


def test_soft_capped_logits_are_scored_from_full_logits_on_a_layout():
    """Gemma-2 (eager attention: it has no SDPA path) caps its logits, so its sequence log-probs
    come from its own forward's full logits; on a layout too. Its per-token KL (TDPO) does not,
    so that loss keeps the usual layout (test_a_transformed_head_keeps_tdpo_on_the_usual_layout)."""
    model, batch = make_model("gemma2", "eager"), make_batch()
    assert logps.has_logit_transform(model)
    lay = layout(batch, (True, True, 30))
    with torch.no_grad():
        expected = usual_logps(model, batch, False)
        got = packing.model_logps(model, lay, False, CHUNK)
        # hidden states x output weight, without the cap, are other values
        weight, bias = logps.output_layer(model)
        uncapped = logps.completion_logps(packing.model_states(model, lay), weight,
                                          lay.selections["chosen"], bias, False, CHUNK)
    assert (uncapped - expected["chosen"]).abs().min() > 0.1
    for side in SIDES:
        torch.testing.assert_close(got[side].logps, expected[side], rtol=0, atol=1e-5)
    assert_same_gradients("gemma2", "eager", LOSSES[:4], SETTINGS[2:4])


# ----------------------------------------------------------------------------- the layout

def segment_of(lay, number):
    """(input ids, position ids, branch) of segment `number`, in row order."""
    where = lay.segment == number
    return tuple(t[where].tolist() for t in (lay.input_ids, lay.position_ids, lay.branch))


def test_each_prompt_is_laid_out_once_and_positions_restart_for_the_rejected():
    batch = make_batch()
    for setting in [(True, False, None), (True, True, None), (True, True, 30)]:
        lay = layout(batch, setting)
        assert lay.tokens == sum(p + c + r for p, c, r in LENGTHS)
        assert int((lay.segment >= 0).sum()) == lay.tokens
        assert lay.segment.max() == len(LENGTHS) - 1  # one segment per pair
        for b, (p, c, r) in enumerate(LENGTHS):
            chosen = batch["chosen_input_ids"][b, :p + c].tolist()
            rejected = batch["rejected_input_ids"][b, p:p + r].tolist()
            ids, positions, branch = segment_of(lay, b)
            assert ids == chosen + rejected
            assert positions == list(range(p + c)) + list(range(p, p + r))
            assert branch == [packing.TRUNK] * p + [packing.BRANCH["chosen"]] * c + \
                [packing.BRANCH["rejected"]] * r


@pytest.mark.parametrize("seed", range(3))
def test_every_scored_token_is_found_where_its_sequence_was_laid_out(seed):
    """Random batches (some pairs without a common prompt, a label hole in a response), every
    setting, both sides and SFT's one: the Selection's k-th entry of sequence b is position t of
    that sequence (its token and position id in the rows) and its target is the label at t + 1,
    for exactly the t whose next label counts, in order."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lengths = [(rng.randint(0, 6), rng.randint(1, 6), rng.randint(1, 6)) for _ in range(7)]
    elements = [element(*(random_ids(g, n) for n in triple)) for triple in lengths]
    for pair in elements[::3]:  # another prompt (of the same length) before the rejected
        n = len(pair["prompt_input_ids"])
        pair["rejected_input_ids"][:n] = [(i % (VOCAB - 1)) + 1 for i in pair["rejected_input_ids"][:n]]
    batch = pdx.collate(elements, 0)
    batch["chosen_labels"][1, -1] = -100  # a label hole: padding of row 1 or its last token
    for sides in (SIDES, ("chosen",)):
        for setting in SETTINGS + [(False, False, None)]:
            lay = packing.build_layout(batch, sides, *setting)
            ids, positions = lay.input_ids.flatten(), lay.position_ids.flatten()
            for side in sides:
                sel = lay.selections[side]
                for b in range(len(lengths)):
                    n = int(batch[f"{side}_attention_mask"][b].sum())
                    tokens, labels = batch[f"{side}_input_ids"][b, :n], batch[f"{side}_labels"][b, :n]
                    scored = [t for t in range(n - 1) if labels[t + 1] != -100]
                    at = sel.index[sel.seq == b]
                    assert ids[at].tolist() == tokens[scored].tolist(), (side, setting, b)
                    assert positions[at].tolist() == scored, (side, setting, b)
                    assert sel.targets[sel.seq == b].tolist() == labels[[t + 1 for t in scored]].tolist()
                    assert int(sel.counts[b]) == len(scored)
                assert sel.seq.tolist() == sorted(sel.seq.tolist())


def test_padding_fraction_worked_by_hand():
    # two pairs: (prompt, chosen, rejected) = (2, 3, 1) and (1, 1, 2)
    batch = make_batch([(2, 3, 1), (1, 1, 2)])
    # usual: chosen rows of 5 and 2 tokens padded to 5, rejected rows of 3 and 3: 13 of 16 real
    assert packing.padding_fraction(batch, SIDES) == pytest.approx(3 / 16)
    assert packing.padding_fraction(batch, ("chosen",)) == pytest.approx(3 / 10)
    # shared prompts: segments of 6 and 4 tokens, one per row of 6 (4 + 6 > 6)
    assert layout(batch, (True, True, None)).padding_fraction == pytest.approx(2 / 12)
    assert layout(batch, (True, False, None)).padding_fraction == pytest.approx(2 / 12)
    # a budget of 10 fits both in one row: no padding
    lay = layout(batch, (True, True, 10))
    assert tuple(lay.input_ids.shape) == (1, 10) and lay.padding_fraction == 0
    # packing alone: sequences of 5, 3, 2, 3 into rows of 5 -> [5], [3, 2], [3]: 13 of 15
    lay = layout(batch, (False, True, None))
    assert tuple(lay.input_ids.shape) == (3, 5)
    assert lay.padding_fraction == pytest.approx(2 / 15)
    # neither: one row per sequence, padded to the longest (5): 13 of 20
    assert layout(batch, (False, False, None)).padding_fraction == pytest.approx(7 / 20)


def test_mask_worked_by_hand():
    """Pairs A (2, 2, 1), B (1, 1, 1), C (1, 2, 1) with rows of 8 tokens: first-fit decreasing
    puts A (5 tokens) then B (3) in row 0, C (4) in row 1 followed by padding."""
    lay = layout(make_batch([(2, 2, 1), (1, 1, 1), (1, 2, 1)]), (True, True, 8))
    assert lay.segment.tolist() == [[0] * 5 + [1] * 3, [2] * 4 + [-1] * 4]
    a = [[1, 0, 0, 0, 0],   # prompt 0
         [1, 1, 0, 0, 0],   # prompt 1
         [1, 1, 1, 0, 0],   # chosen 0
         [1, 1, 1, 1, 0],   # chosen 1
         [1, 1, 0, 0, 1]]   # rejected 0: the prompt and itself, not the chosen tokens
    b = [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    c = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[0, :5, :5], expected[0, 5:, 5:] = torch.tensor(a).bool(), torch.tensor(b).bool()
    expected[1, :4, :4] = torch.tensor(c).bool()
    expected[1, 4:, 4:] = torch.eye(4, dtype=torch.bool)  # padding sees itself only (no NaN row)
    assert torch.equal(lay.allowed(), expected)
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1], [0, 1, 2, 1, 0, 0, 0, 0]]
    # one additive mask for SDPA and eager attention, made once per dtype and shared
    sdpa = lay.attention_mask(make_model("llama", "sdpa"))
    eager = lay.attention_mask(make_model("llama", "eager"))
    assert eager is sdpa
    assert eager.dtype == torch.float32 and eager.shape == (2, 1, 8, 8)
    assert torch.equal(eager == 0, expected[:, None])
    assert (eager[~expected[:, None]] == torch.finfo(torch.float32).min).all()
    half = lay.attention_mask(make_model("llama", "sdpa").to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.equal(half == 0, expected[:, None])


def test_block_mask_matches_the_dense_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    lay = layout(make_batch(), (True, True, 30))
    block = lay.block_mask()
    rows, length = lay.segment.shape
    dense = flex.create_mask(block.mask_mod, rows, 1, length, length, device="cpu")
    assert torch.equal(dense[:, 0], lay.allowed())


def test_pairs_without_a_common_prompt_are_two_segments_and_score_exactly():
    g = torch.Generator().manual_seed(3)
    prompt, other = random_ids(g, 4), random_ids(g, 4)
    other[0] = prompt[0] % (VOCAB - 1) + 1  # differs from the first prompt token, still valid
    elements = [element(random_ids(g, 3), random_ids(g, 2), random_ids(g, 4)),
                element(prompt, random_ids(g, 3), random_ids(g, 2), rejected_prompt=other),
                element([], random_ids(g, 3), random_ids(g, 5)),  # no prompt at all
                element(random_ids(g, 2), random_ids(g, 1), random_ids(g, 3))]
    batch = pdx.collate(elements, 0)
    lay = layout(batch, (True, True, None))
    assert int(lay.segment.max()) + 1 == 6  # pairs 1 and 2 as two segments each
    assert lay.tokens == (3 + 2 + 4) + (4 + 3) + (4 + 2) + (3 + 5) + (2 + 1 + 3)
    model = make_model("llama")
    reference = references.ModelReference(make_model("llama", seed=1), CHUNK)
    want, want_grads = scored(model, reference, batch, "dpo", {"beta": 0.1}, None)
    got, got_grads = scored(model, reference, batch, "dpo", {"beta": 0.1}, lay)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=0, atol=1e-5)


def rows_of(lay):
    """{row: sorted segment numbers in it}."""
    return {r: sorted(set(lay.segment[r].tolist()) - {-1}) for r in range(len(lay.segment))}


def test_a_pair_longer_than_the_budget_gets_a_row_of_its_own():
    lengths = [(2, 1, 1), (10, 6, 6), (2, 1, 1), (2, 1, 1)]  # segments of 4, 22, 4, 4 tokens
    batch = make_batch(lengths)
    lay = layout(batch, (True, True, 8))
    assert [1] in rows_of(lay).values()  # the 22-token pair is alone
    assert lay.input_ids.shape[1] == 22  # no row beyond the longest pair
    fill = (lay.segment >= 0).sum(-1)
    assert (fill <= 22).all() and int(fill.sum()) == 22 + 3 * 4
    # a budget above the whole batch packs all of it into one row of 34 tokens
    one = layout(batch, (True, True, 100))
    assert tuple(one.input_ids.shape) == (1, 34) and one.padding_fraction == 0
    # a budget of 12: first-fit decreasing gives [22] and [4, 4, 4]
    assert sorted(rows_of(layout(batch, (True, True, 12))).values()) == [[0, 2, 3], [1]]
    model = make_model("qwen2")
    with torch.no_grad():
        want = usual_logps(model, batch, False)
        for lay_ in (lay, one):
            got = packing.model_logps(model, lay_, False, CHUNK)
            for side in SIDES:
                torch.testing.assert_close(got[side].logps, want[side], rtol=0, atol=1e-5)


def test_sft_layout_packs_the_chosen_sequences_only():
    batch = make_batch()
    lay = layout(batch, (True, True, None), ("chosen",))
    assert set(lay.selections) == {"chosen"}
    assert lay.tokens == sum(p + c for p, c, _ in LENGTHS)
    assert (lay.branch == packing.TRUNK).all()
    sel = lay.selections["chosen"]
    assert sel.counts.tolist() == [c for _, c, _ in LENGTHS]  # the prompt is not scored
    assert sel.targets.tolist() == [t for b, (p, c, _) in enumerate(LENGTHS)
                                    for t in batch["chosen_input_ids"][b, p:p + c].tolist()]


# ----------------------------------------------------------------------------- FlexAttention

@pytest.mark.slow
def test_flex_attention_block_mask_scores_like_the_usual_layout():
    """Forward only, under no_grad: FlexAttention has no backward on CPU. One layout shape is
    compiled (each new shape compiles again, and after the first few torch 2.13's CPU Inductor
    moves to a dynamic-shape kernel that fails to compile for some shapes); the usual layout is
    scored with SDPA, the same attention computed densely."""
    if not tf.utils.is_torch_flex_attn_available():
        pytest.skip("FlexAttention is not available in this torch")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler for torch.compile on CPU")
    model, batch = make_model("llama"), make_batch()
    with torch.no_grad():
        want = usual_logps(model, batch, False)
        model.config._attn_implementation = "flex_attention"
        assert model.model.layers[0].self_attn.config._attn_implementation == "flex_attention"
        lay = layout(batch, (True, True, 30))
        assert type(lay.attention_mask(model)).__name__ == "BlockMask"
        got = packing.model_logps(model, lay, False, CHUNK)
    for side in SIDES:
        torch.testing.assert_close(got[side].logps, want[side], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- fallback

def check(policy, batch, capsys, reference=None, max_length=64, token_level=False):
    """(scoring.check_layout's verdict, the lines it printed)."""
    ok = scoring.check_layout(policy, reference, lambda fn, *args: fn(*args), batch, SIDES,
                              lambda b: layout(b, (True, True, None)), max_length, CHUNK,
                              lambda flag: flag, token_level)
    return ok, capsys.readouterr().out.splitlines()


def test_a_model_that_takes_the_layout_keeps_it_silently(capsys):
    assert check(make_model("llama"), make_batch(), capsys,
                 reference=make_model("gpt2")) == (True, [])


def assert_one_warning(outcome, *phrases):
    ok, lines = outcome
    assert ok is False
    assert len(lines) == 1 and lines[0].startswith("warning: share_prompt/packing are off"), lines
    assert all(p in lines[0] for p in phrases), lines[0]


def test_attention_without_custom_masks_falls_back_with_one_warning(capsys):
    model = make_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # the config only: never run
    assert_one_warning(check(model, make_batch(), capsys), "the policy cannot take it",
                       "'flash_attention_2'")
    reference = make_model("llama")
    reference.config._attn_implementation = "flash_attention_2"
    assert_one_warning(check(make_model("llama"), make_batch(), capsys, reference),
                       "the reference model cannot take it")


def test_a_sliding_window_shorter_than_max_length_falls_back(capsys):
    config = _config("mistral")
    config.sliding_window = 8
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    assert_one_warning(check(model, make_batch(), capsys, max_length=64), "sliding window (8)")
    # a window no shorter than any sequence changes nothing: the layout stays
    assert check(model, make_batch([(2, 3, 1), (1, 1, 2)]), capsys, max_length=8) == (True, [])


def test_a_transformed_head_keeps_tdpo_on_the_usual_layout(capsys):
    model = make_model("gemma2", "eager")
    assert check(model, make_batch(), capsys) == (True, [])
    assert_one_warning(check(model, make_batch(), capsys, token_level=True),
                       "the policy cannot take it: its per-token KL comes from full logits")


def test_log_probs_that_differ_fall_back_with_one_warning(capsys, monkeypatch):
    """A model that reads a custom mask wrongly: here, attention over the whole row."""
    monkeypatch.setattr(packing.Layout, "attention_mask",
                        lambda self, model: torch.ones_like(self.allowed()[:, None]))
    assert_one_warning(check(make_model("llama"), make_batch(), capsys),
                       "the policy's log-probs on it differ")


ALIBI = {"bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
         "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, alibi=True)}


@pytest.mark.parametrize("family", sorted(ALIBI))
def test_alibi_models_fall_back_with_one_warning(family, capsys):
    """BLOOM and Falcon with alibi=True build their ALiBi biases from a (B, T) attention mask and
    have no position ids to restart (BLOOM's forward takes none; Falcon's ignores them): they
    train on the usual layout, so the start-up check must fall back with one line, not crash."""
    config = ALIBI[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    usual_logps(model, make_batch(), False)  # the usual layout works
    assert_one_warning(check(model, make_batch(), capsys))


# ----------------------------------------------------------------------------- MoE

def test_router_loss_on_a_layout_counts_each_real_token_once():
    """Mixtral's load-balancing loss on a layout equals the loss over exactly the batch's real
    tokens, the prompt once, each routed as in the usual layout (router logits of a token depend
    only on what it attends to)."""
    model, batch = make_model("mixtral"), make_batch()
    router = moe.RouterLoss(model, 0.01)
    lay = layout(batch, (True, True, None))
    assert lay.padding_fraction > 0.1  # so that counting padding would show
    with router.collecting():
        packing.model_logps(model, lay, False, CHUNK)
    base = torch.tensor(2.0)
    total, metrics = router.add_to(base)
    cfg = model.config
    with torch.no_grad():
        usual = {side: model.model(input_ids=batch[f"{side}_input_ids"],
                                   attention_mask=batch[f"{side}_attention_mask"],
                                   output_router_logits=True).router_logits for side in SIDES}
    per_layer = []
    for layer in range(cfg.num_hidden_layers):
        rows = {side: usual[side][layer].view(len(LENGTHS), -1, cfg.num_local_experts)
                for side in SIDES}
        per_layer.append(torch.cat([
            torch.cat([rows["chosen"][b, :p + c], rows["rejected"][b, p:p + r]])
            for b, (p, c, r) in enumerate(LENGTHS)]))
    expected = load_balancing_loss_func(tuple(per_layer), cfg.num_local_experts,
                                        cfg.num_experts_per_tok, None)
    torch.testing.assert_close(metrics["aux_loss"], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(total, base + 0.01 * expected)
    with torch.no_grad():  # the same forward with padding counted gives another value
        unmasked = model.model(**lay.forward_kwargs(model), output_router_logits=True)
        padded = load_balancing_loss_func(unmasked.router_logits, cfg.num_local_experts,
                                cfg.num_experts_per_tok, None)
    assert abs(float(padded - expected)) > 1e-4


# ----------------------------------------------------------------------------- training runs

SHORT = [*FAST, "n_examples=32", "n_eval_examples=16", "do_first_eval=false",
         "save_hf_format=false"]
OFF = ["share_prompt=false", "packing=false"]


def final_state(run_dir):
    path = run_dir / "LATEST" / "policy.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def paired_runs(tmp_path, monkeypatch, overrides):
    """Runs with the default layout and with the usual one; (weights, padding fractions, layouts
    built) of each, after checking that both logged the padding of every train step."""
    built = []
    real = packing.build_layout
    monkeypatch.setattr(packing, "build_layout", lambda *a, **k: built.append(1) or real(*a, **k))
    out = []
    for name, extra in (("packed", []), ("usual", OFF)):
        n_before = len(built)
        run_dir = run_in_process([*SHORT, f"local_run_dir={tmp_path}/{name}", *overrides, *extra])
        train_rows = [m for m in read_metrics(run_dir) if "loss/train" in m]
        assert train_rows and all("tokens/padding_fraction" in m for m in train_rows)
        assert not any("tokens/padding_fraction" in m for m in read_metrics(run_dir)
                       if "loss/eval" in m)
        padding = [m["tokens/padding_fraction"] for m in train_rows]
        out.append((final_state(run_dir), padding, len(built) - n_before))
    (packed, packed_padding, n_packed), (usual, usual_padding, n_usual) = out
    assert n_packed > 0 and n_usual == 0  # the defaults did lay batches out; the usual run did not
    assert packed.keys() == usual.keys()
    for key in usual:
        torch.testing.assert_close(packed[key], usual[key], rtol=0, atol=1e-5, msg=key)
    return packed_padding, usual_padding


@pytest.mark.slow
@pytest.mark.parametrize("loss", [["loss=dpo", "loss.beta=0.1"], ["loss=sft"],
                                  ["loss=tdpo", "loss.beta=0.1"]])
def test_embedded_runs_with_the_default_layout_train_to_the_same_weights(
        loss, tmp_path, monkeypatch):
    paired_runs(tmp_path, monkeypatch, loss)


def write_uneven_pairs(path, n=48, seed=0):
    """A TRL-format preference file whose prompts and responses have very different lengths (in
    words the embedded tokenizer keeps whole)."""
    rng = random.Random(seed)
    words = ["map", "pen", "box", "key", "cup", "hat", "sun", "dog"]
    with open(path, "w") as f:
        for _ in range(n):
            said = [rng.choice(words) for _ in range(rng.choice([1, 2, 12]))]
            wrong = [rng.choice(words) for _ in range(rng.choice([1, 10]))]
            row = {"prompt": f"\n\nHuman: Repeat the words: {' '.join(said)}\n\nAssistant:",
                   "chosen": " " + " ".join(said), "rejected": " " + " ".join(wrong + said[:1])}
            f.write(json.dumps(row) + "\n")
    return path


def test_user_file_with_uneven_lengths_pads_less_and_trains_the_same(tmp_path, monkeypatch):
    """DPO on pairs of very uneven lengths, batched as they come (group_by_length=false, as in the
    DPO repository): packing removes most of the padding; the weights stay those of the usual
    layout."""
    data = write_uneven_pairs(tmp_path / "prefs.jsonl")
    packed, usual = paired_runs(tmp_path, monkeypatch,
                                ["loss=dpo", "loss.beta=0.1", f"datasets=[{data}]",
                                 "group_by_length=false"])
    assert min(usual) > 0.1
    assert sum(packed) / len(packed) < 0.5 * sum(usual) / len(usual)


def test_trainer_takes_the_layout_unless_its_model_cannot(tmp_path, capsys):
    """The trainer's start-up check (scoring.check_layout) and the padding it logs per train step:
    that of the layout, or of the usual rows after falling back."""
    from test_train import make_trainer
    common = ["loss=dpo", "loss.beta=0.1", "group_by_length=false"]
    trainer = make_trainer(common, tmp_path / "llama")
    assert trainer.uses_layout
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    batch = next(iter(trainer.train_iterator()))
    logged = trainer.train_step(batch)
    padding = logged["tokens/padding_fraction"]
    assert padding == pytest.approx(trainer.build_layout(batch).padding_fraction)
    assert logged["tokens/computed"] == trainer.build_layout(batch).input_ids.numel()
    windowed = make_trainer([*common, "model.from_config.model_type=mistral",
                             "+model.from_config.sliding_window=16",
                             "model.block_name=MistralDecoderLayer"], tmp_path / "mistral")
    assert not windowed.uses_layout
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: share_prompt/packing are off: the policy cannot take it: its sliding window (16)")
    logged_usual = windowed.train_step(batch)
    usual = logged_usual["tokens/padding_fraction"]
    assert usual == pytest.approx(packing.padding_fraction(batch, SIDES)) and usual > 0
    # a larger share of padding than the usual rows can go with fewer token slots (the prompts
    # are laid out once): the slots are what costs, and tokens/computed counts them
    slots = sum(batch[f"{side}_input_ids"].numel() for side in SIDES)
    assert logged_usual["tokens/computed"] == slots
    assert logged["tokens/computed"] < 0.75 * slots
