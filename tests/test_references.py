"""references.py: each reference kind gives the same log-probs through the one scoring path
(Reference.layout_logps), and ref_cache.py's hash keys the cache by the weights."""
import copy

import pytest
import torch

import packing
import parallel
import ref_cache
import references
from test_scoring import SIDES, pair_batch, tiny_model

RANKS = parallel.Ranks(0, 1, True, torch.device("cpu"))


def test_model_reference_scores_every_layout_alike():
    """One layout per side or shared prompts and packed rows: the same (B,) log-probs (float64:
    the layouts differ only in float rounding, far below 1e-10)."""
    reference, batch = references.ModelReference(tiny_model(1), 3), pair_batch()
    plain = {side: reference.sequence_logps(batch, side, False) for side in SIDES}
    packed = reference.layout_logps(batch, packing.build_layout(batch, SIDES, True, True, None),
                                    False)
    for side in SIDES:
        torch.testing.assert_close(packed[side].logps, plain[side], rtol=0, atol=1e-10)
        assert not packed[side].logps.requires_grad


def test_cached_reference_gives_the_live_references_log_probs():
    """precompute_ref_log_probs: the cached sums, means and LD-DPO public parts are the live
    model's, on any layout of the batch."""
    live, batch = references.ModelReference(tiny_model(1), 3), pair_batch()
    cached = references.CachedReference(copy.copy(live), ref_cache.weights_hash(live.model), RANKS)
    cached.prepare(lambda: iter([(batch, 1)]), lambda b, part, n: b, SIDES)
    assert cached.model is None  # the model is dropped once the cache is ready
    shared = packing.shared_tokens(batch)
    assert shared.tolist() == [2, 1]
    for layouts in (packing.lay_out(batch, SIDES, False, False, None),
                    packing.lay_out(batch, SIDES, True, True, None)):
        for layout in layouts:
            for average in (False, True):
                want = live.layout_logps(batch, layout, average, shared)
                got = cached.layout_logps(batch, layout, average, shared)
                for side in layout.selections:
                    torch.testing.assert_close(got[side].logps, want[side].logps)
                    torch.testing.assert_close(got[side].public, want[side].public)


def test_a_sequence_outside_the_cache_is_one_clear_error():
    live, batch = references.ModelReference(tiny_model(1), 3), pair_batch()
    cached = references.CachedReference(live, ref_cache.weights_hash(live.model), RANKS)
    cached.prepare(lambda: iter([(batch, 1)]), lambda b, part, n: b, SIDES)
    other = dict(batch, chosen_input_ids=batch["chosen_input_ids"] + 1)
    with pytest.raises(references.ReferenceCacheMiss, match="chosen sequence of this batch"):
        cached.sequence_logps(other, "chosen", False)


def test_no_reference_has_no_log_probs():
    with pytest.raises(NotImplementedError, match="NoReference has no reference log-probs"):
        references.NoReference().sequence_logps(pair_batch(), "chosen", False)


def test_weights_hash_follows_the_weights_only():
    model = tiny_model(1)
    twin = copy.deepcopy(model)
    assert ref_cache.weights_hash(model) == ref_cache.weights_hash(twin)
    with torch.no_grad():
        next(twin.parameters())[0, 0] += 1e-6
    assert ref_cache.weights_hash(model) != ref_cache.weights_hash(twin)
    # a kept subset hashes only those weights
    assert ref_cache.weights_hash(model, lambda n: "embed" in n) == \
        ref_cache.weights_hash(copy.deepcopy(model), lambda n: "embed" in n)


def test_the_interface_defines_load_checkpoint_states_once():
    import inspect
    source = inspect.getsource(references.Reference)
    assert source.count("def load_checkpoint_states") == 1
