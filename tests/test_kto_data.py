"""Unpaired preference data (TRL's KTO format): reading it in every file format, unpairing paired
data as TRL's `unpair_preference_dataset`, batches that keep both labels, the mismatched (KL)
sequences, and the one-line refusals. Expected values are worked out by hand below."""
import csv
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import preference_datasets as pdx
from kto_cpo_orpo import kto_weight_advice
from preference_datasets import DatasetFormatError
from test_datasets import make_tokenizer

ROWS = [
    {"prompt": "The sky is", "completion": " blue.", "label": True},
    {"prompt": "The sky is", "completion": " green.", "label": False},
    {"prompt": "The sun is", "completion": " hot.", "label": True},
    {"prompt": "Two and two", "completion": " make five.", "label": False},
]
EXPECTED = {
    "The sky is": {"responses": [" blue.", " green."], "pairs": [], "sft_target": " blue.",
                   "examples": [(0, True), (1, False)]},
    "The sun is": {"responses": [" hot."], "pairs": [], "sft_target": " hot.", "examples": [(0, True)]},
    "Two and two": {"responses": [" make five."], "pairs": [], "sft_target": None, "examples": [(0, False)]},
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion", "label"])
        writer.writeheader()
        for row in rows:  # CSV has no booleans: spreadsheets write TRUE/FALSE
            writer.writerow(dict(row, label="TRUE" if row["label"] else "FALSE"))
    return path


def test_unpaired_file_in_every_format(tmp_path, tok):
    jsonl = _write(tmp_path / "kto.jsonl", ROWS)
    assert pdx.get_dataset(str(jsonl), "train", silent=True) == EXPECTED
    (tmp_path / "kto.json").write_text(json.dumps(ROWS))
    (tmp_path / "kto.jsonl.gz").write_bytes(gzip.compress(jsonl.read_bytes()))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "kto.parquet")
    _csv(tmp_path / "kto.csv", ROWS)
    for name in ("kto.json", "kto.jsonl.gz", "kto.parquet", "kto.csv"):
        assert pdx.get_dataset(str(tmp_path / name), "test", silent=True) == EXPECTED, name


def test_unpaired_conversational_rows(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Hello!"}], "label": True},
            {"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Go away."}], "label": False}]
    data = pdx.get_dataset(str(_write(tmp_path / "chat.jsonl", rows)), "train", silent=True, tokenizer=tok)
    assert data == {"<|user|>Hi<|end|><|assistant|>": {
        "responses": ["Hello!<|end|>", "Go away.<|end|>"], "pairs": [], "sft_target": "Hello!<|end|>",
        "examples": [(0, True), (1, False)]}}


def test_unpairing_paired_data_as_trl():
    # TRL's unpair_preference_dataset: each pair gives (prompt, chosen, True) and (prompt, rejected, False)
    data = {"P": {"responses": [" a", " b", " c"], "pairs": [(0, 1), (2, 1)], "sft_target": " a"}}
    columns, sizes = pdx._flatten_unpaired(data)
    assert columns["chosen_response"] == [" a", " b", " c", " b"]
    assert columns["label"] == [True, False, True, False]
    assert columns["prompt"] == ["P"] * 4 and sizes == [4]


def _iterator(tok, names, paths=None, batch_size=4, weights=(1.0, 1.0), **kw):
    kw.setdefault("n_epochs", 1)
    return pdx.get_batch_iterator(names, tok, batch_size=batch_size, max_length=64, max_prompt_length=32,
                                  silent=True, paths=paths, unpaired_weights=weights, **kw)


def test_synthetic_pairs_unpaired_batches_keep_both_labels(tok):
    batches = list(_iterator(tok, ["synthetic"], split="test", batch_size=6, seed=3))
    assert len(batches) == 400 * 2 // 6  # 400 pairs unpaired: 400 + 400 examples, 3 of each per batch
    for batch in batches:
        assert batch["label"].dtype == torch.bool and int(batch["label"].sum()) == 3


def test_mismatched_sequences_are_the_rotated_completions(tok):
    batch = next(iter(_iterator(tok, ["synthetic"], split="test", batch_size=4, seed=1)))
    for i in range(4):
        j = (i - 1) % 4  # TRL: (x_1, y_n), (x_2, y_1), ...
        assert batch["rejected"][i] == batch["prompt"][i] + batch["chosen_response_only"][j]
        ids = batch["rejected_input_ids"][i][batch["rejected_attention_mask"][i].bool()].tolist()
        prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        other = batch["chosen_labels"][j][batch["chosen_labels"][j] != -100].tolist()
        assert ids == prompt + other
        labels = batch["rejected_labels"][i]
        assert labels[labels != -100].tolist() == other


def test_imbalanced_labels_each_batch_has_both(tmp_path, tok, capsys):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}", "label": i % 10 == 0} for i in range(100)]
    path = str(_write(tmp_path / "imbalanced.jsonl", rows))
    batches = list(pdx.get_batch_iterator([path], tok, batch_size=8, max_length=64, max_prompt_length=32,
                                          n_epochs=1, unpaired_weights=(1.0, 1.0)))
    # 10 desirable of 100: round(8 * 0.1) = 1 desirable per batch; 90 // 7 = 12 batches
    assert len(batches) == 10 and all(int(b["label"].sum()) == 1 for b in batches)
    out = capsys.readouterr().out
    assert "10 desirable and 90 undesirable examples" in out
    # TRL's advice: desirable_weight in [9.0, 11.97] or undesirable_weight in [0.08, 0.11]
    assert "warning:" in out and "[9.0, 11.97]" in out and "[0.08, 0.11]" in out


def test_weight_advice_as_trl():
    assert kto_weight_advice(100, 100, 1.0, 1.0) is None
    assert kto_weight_advice(10, 90, 9.5, 1.0) is None  # desirable weight in range
    assert kto_weight_advice(90, 10, 1.0, 1.0) is not None


def test_refusals(tmp_path, tok):
    unpaired = str(_write(tmp_path / "kto.jsonl", ROWS))
    with pytest.raises(DatasetFormatError, match="unpaired examples .* use loss=kto"):
        pdx.get_batch_iterator([unpaired], tok, batch_size=1, n_epochs=1, silent=True)
    one_label = str(_write(tmp_path / "good.jsonl", [r for r in ROWS if r["label"]] * 2))
    with pytest.raises(DatasetFormatError, match=r"all 4 examples are desirable .* loss=sft"):
        _iterator(tok, [one_label], batch_size=2)
    with pytest.raises(ValueError, match="at least 2 examples per batch"):
        _iterator(tok, [unpaired], batch_size=1)
    mixed = str(_write(tmp_path / "mixed.jsonl", ROWS[:1] + [{"prompt": "p", "chosen": " a", "rejected": " b"}]))
    with pytest.raises(DatasetFormatError, match="line 2: mixes unpaired rows"):
        pdx.get_dataset(mixed, "train", silent=True)
    bad = str(_write(tmp_path / "bad.jsonl", [dict(ROWS[0], label="maybe")]))
    with pytest.raises(DatasetFormatError, match="line 1: column 'label' must be true or false"):
        pdx.get_dataset(bad, "train", silent=True)


def test_sft_reads_the_desirable_completions(tmp_path, tok):
    path = str(_write(tmp_path / "kto.jsonl", ROWS))
    batches = list(pdx.get_batch_iterator([path], tok, batch_size=1, n_epochs=1, shuffle=False, sft_mode=True,
                                          silent=True))
    assert [b["chosen_response_only"][0] for b in batches] == [" blue.", " hot."]


def test_labelled_schedule_is_seeded_and_resumable():
    labels = np.array([True, False] * 10)
    a = pdx._labelled_epoch_batches(2, labels, 4, True, seed=5)
    assert (a == pdx._labelled_epoch_batches(2, labels, 4, True, seed=5)).all()
    assert not (a == pdx._labelled_epoch_batches(3, labels, 4, True, seed=5)).all()
    assert sorted(a.ravel().tolist()) == list(range(20))


def test_group_by_length_keeps_both_labels_and_groups_lengths():
    labels = np.array([True, False] * 200)
    lengths = np.arange(400)[::-1].copy()
    batches = pdx._labelled_epoch_batches(0, labels, 4, True, seed=1, lengths=lengths)
    assert all(labels[b].sum() == 2 for b in batches)
    assert sorted(batches.ravel().tolist()) == list(range(400))
    # lengths sorted within chunks of 50 batches: a batch spans far fewer lengths than a random one
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[b]) for b in pdx._labelled_epoch_batches(0, labels, 4, True, seed=1)])
    assert spread < random_spread / 5


def test_integer_labels_are_read(tmp_path):
    rows = [dict(r, label=int(r["label"])) for r in ROWS]
    assert pdx.get_dataset(str(_write(tmp_path / "ints.jsonl", rows)), "train", silent=True) == EXPECTED
    with pytest.raises(DatasetFormatError, match="column 'label' must be true or false, got 2"):
        pdx.get_dataset(str(_write(tmp_path / "two.jsonl", [dict(ROWS[0], label=2)])), "train", silent=True)
