"""logps.py's pieces on selected rows (what packing.model_logps / token_kl call) against the
full-logits formulas at the top of logps.py, in float64 (1e-10: rounding only)."""
import pytest
import torch

import logps

D = torch.float64


def rows_and_selection(seed=0):
    """(R, L, V) logits of 2 rows and a Selection of 5 scored positions of 2 sequences, with the
    (B, T) labels that score the same positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 7, dtype=D, generator=g)
    labels = torch.full((2, 4), logps.IGNORE_INDEX)
    labels[0, 1:4] = torch.tensor([3, 1, 6])
    labels[1, 2:4] = torch.tensor([2, 5])
    seq, pos = (labels[:, 1:] != logps.IGNORE_INDEX).nonzero(as_tuple=True)
    selection = logps.Selection(seq * 4 + pos, labels[:, 1:][seq, pos], seq,
                                (labels[:, 1:] != logps.IGNORE_INDEX).sum(-1))
    return logits, labels, selection


@pytest.mark.parametrize("average", [False, True])
def test_selected_rows_summed_per_sequence_equal_get_batch_logps(average):
    logits, labels, selection = rows_and_selection()
    per_row, wpo = logps.selected_rows(logits, selection)
    assert wpo is None
    got = logps.side_logps(per_row, selection, average)
    torch.testing.assert_close(got.logps, logps.get_batch_logps(logits, labels, average),
                               rtol=0, atol=1e-10)
    assert got.public is None and got.wpo_logweight is None


def test_side_logps_public_and_wpo_parts_equal_get_batch_parts():
    logits, labels, selection = rows_and_selection(1)
    shared = torch.tensor([2, 1])
    per_row, wpo = logps.selected_rows(logits, selection, wpo=True)
    got = logps.side_logps(per_row, selection, False, shared, wpo)
    want = logps.get_batch_parts(logits, labels, shared, wpo=True)
    for mine, theirs in ((got.logps, want["sum"]), (got.public, want["public"]),
                         (got.wpo_logweight, want["wpo_logweight"])):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


def test_selected_token_kl_equals_tdpo_get_batch_logps():
    logits, labels, selection = rows_and_selection(2)
    reference = logits + torch.randn(logits.shape, dtype=D, generator=torch.Generator().manual_seed(9))
    logp, ref_logp, kl = logps.selected_token_kl(logits, reference, selection)
    got = [logps.side_logps(x, selection, False).logps for x in (logp - ref_logp, kl, logp)]
    for mine, theirs in zip(got, logps.tdpo_get_batch_logps(logits, reference, labels)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


def test_chunked_kernel_on_a_selection_equals_full_logits():
    """TokenLogpFunction on the selected hidden rows = log_softmax of hidden @ W.T, with and
    without a backward to come (kept_rows)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 4, 5, dtype=D, generator=g, requires_grad=True)
    weight = torch.randn(7, 5, dtype=D, generator=g)
    _, labels, selection = rows_and_selection()
    rows = hidden.flatten(0, 1)[selection.index]
    assert logps.kept_rows(2, rows, weight) == 2
    with torch.no_grad():
        assert logps.kept_rows(2, rows, weight) == 0
    per_row, _ = logps.TokenLogpFunction.apply(rows, weight, None, selection.targets, 2, False,
                                               logps.kept_rows(2, rows, weight))
    want = logps.get_batch_logps(hidden @ weight.T, labels)
    torch.testing.assert_close(logps.side_logps(per_row, selection, False).logps, want,
                               rtol=0, atol=1e-10)
    per_row.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
