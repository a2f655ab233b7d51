"""Tests for preference_datasets: loaders, tokenisation, batching and caching.

Real Anthropic HH rows live in ../shared/data/hh beside the checkout (never copied into
the project); tests that need them skip when that folder is absent.  SHP, SE and
TRL-format fixtures in tests/fixtures/ are small hand-written files in the hub schemas,
and their expected outputs below were worked out by hand.
"""
import gzip
import json
import math
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import preference_datasets as pdx
import synthetic_data
from preference_datasets import DatasetFormatError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared"
HH_DIR = SHARED / "data" / "hh"
HH_FILES = ("helpful-base-test.jsonl", "harmless-base-test.jsonl")
HH_AVAILABLE = all((HH_DIR / name).is_file() for name in HH_FILES)
needs_shared = pytest.mark.skipif(not HH_AVAILABLE, reason="../shared/data/hh is not present")

H, A = "\n\nHuman: ", "\n\nAssistant:"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOKEN_KEYS = {f"{side}_{kind}" for side in ("chosen", "rejected")
              for kind in ("input_ids", "attention_mask", "labels")} | {"prompt_input_ids", "prompt_attention_mask"}
TEXT_KEYS = {"prompt", "chosen", "rejected", "chosen_response_only", "rejected_response_only",
             "prompt_truncated", "response_truncated"}  # the two flags are 0/1 lists, not padded


# ---------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------

def make_tokenizer(with_pad: bool = True, with_template: bool = True) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer; pad is id 5 (not 0) so hard-coded zeros would show."""
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(pdx.synthetic_corpus()[:2000] + [H + "Hello, how are you?" + A + " Fine."], trainer)
    kwargs = {"pad_token": "<|pad|>"} if with_pad else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", **kwargs)
    if with_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    tokenizer = make_tokenizer()
    assert tokenizer.pad_token_id == 5 and tokenizer.eos_token_id == 0
    return tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenisation cache for the module, so each dataset is tokenised once."""
    return str(tmp_path_factory.mktemp("cache"))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def hh_rows(name):
    return [json.loads(line) for line in (HH_DIR / name).read_text(encoding="utf-8").splitlines()]


def jsonl_rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------
# HH: real rows from ../shared
# ---------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("name", HH_FILES)
def test_hh_real_rows_split_losslessly(name):
    rows = hh_rows(name)
    assert len(rows) == 100
    for row in rows:
        prompt, chosen, rejected = pdx.split_hh_transcripts(row["chosen"], row["rejected"])
        assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"]
        assert prompt.startswith(H) and prompt.endswith(A)
        assert prompt.count(H.rstrip()) >= 1


@needs_shared
def test_hh_manifest_flagged_rows():
    manifest = json.loads((HH_DIR / "MANIFEST.json").read_text())
    seen_flags = set()
    for name in HH_FILES:
        rows, info = hh_rows(name), manifest[name]
        data = pdx.get_dataset("hh", "test", silent=True, path=str(HH_DIR / name))
        for source_line, flags in info["edge_case_rows_in_this_file"].items():
            row = rows[info["lines_0based_in_source"].index(int(source_line))]
            prompt, chosen, rejected = pdx.split_hh_transcripts(row["chosen"], row["rejected"])
            assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"]
            entry = data[prompt]
            seen_flags.update(flags)
            if "identical" in flags:
                assert entry["responses"] == [chosen] and entry["pairs"] == []  # no (i, i) pair
                assert entry["sft_target"] == chosen
                continue
            assert entry["responses"] == [chosen, rejected] and entry["pairs"] == [(0, 1)]
            if "empty_rejected_response" in flags:
                assert rejected.strip() == ""
            if "empty_chosen_response" in flags:
                assert chosen.strip() == ""
            if "rejected_not_prefixed_by_chosen_prompt" in flags:
                # the reference cut (chosen's last marker) swallows part of the chosen reply
                reference_prompt = row["chosen"][:row["chosen"].rfind(A) + len(A)]
                assert not row["rejected"].startswith(reference_prompt)
                assert len(prompt) < len(reference_prompt)
            if "rfind_prompt_differs" in flags:
                # cutting each side at its own last marker would give two different prompts
                own_cuts = {side[:side.rfind(A) + len(A)] for side in (row["chosen"], row["rejected"])}
                assert len(own_cuts) == 2
                assert prompt.count(H) == row["chosen"].count(H) == row["rejected"].count(H)
    assert seen_flags == {"identical", "empty_rejected_response", "empty_chosen_response",
                          "rfind_prompt_differs", "rejected_not_prefixed_by_chosen_prompt"}


@needs_shared
def test_hh_real_files_load_every_pair():
    helpful = pdx.get_dataset("hh", "test", silent=True, path=str(HH_DIR / "helpful-base-test.jsonl"))
    harmless = pdx.get_dataset("hh", "test", silent=True, path=str(HH_DIR / "harmless-base-test.jsonl"))
    assert (len(helpful), sum(len(e["pairs"]) for e in helpful.values())) == (100, 98)  # 2 identical rows
    assert (len(harmless), sum(len(e["pairs"]) for e in harmless.values())) == (100, 100)
    # a flat directory of '*test*.jsonl' files (MANIFEST.json is not a test file) reads both
    both = pdx.get_dataset("hh", "test", silent=True, path=str(HH_DIR))
    assert both == {**harmless, **helpful} and list(both) == list(harmless) + list(helpful)


@needs_shared
def test_hh_gzipped_copy_and_hub_layout(tmp_path):
    for name in HH_FILES:  # hub layout: <subset>/{train,test}.jsonl.gz
        subset = tmp_path / "hh" / name.replace("-test.jsonl", "")
        subset.mkdir(parents=True)
        (subset / "test.jsonl.gz").write_bytes(gzip.compress((HH_DIR / name).read_bytes()))
    train_gz = tmp_path / "hh" / "helpful-base" / "train.jsonl.gz"
    train_gz.write_bytes(gzip.compress((FIXTURES / "hh_small.jsonl").read_bytes()))
    flat = pdx.get_dataset("hh", "test", silent=True, path=str(HH_DIR))
    assert pdx.get_dataset("hh", "test", silent=True, path=str(tmp_path / "hh")) == flat
    assert pdx.get_dataset("hh", "train", silent=True, path=str(tmp_path / "hh")) == \
        pdx.get_dataset("hh", "train", silent=True, path=str(FIXTURES / "hh_small.jsonl"))
    one_file = tmp_path / "hh" / "helpful-base" / "test.jsonl.gz"
    assert pdx.get_dataset("hh", "test", silent=True, path=str(one_file)) == \
        pdx.get_dataset("hh", "test", silent=True, path=str(HH_DIR / "helpful-base-test.jsonl"))


# ---------------------------------------------------------------------------
# HH / SHP / SE fixtures with hand-checked outputs
# ---------------------------------------------------------------------------

HH_SMALL_EXPECTED = {
    H + "Hi" + A: {"responses": [" Hello!", " Go away.", " Hello there."], "pairs": [(0, 1), (2, 1)],
                   "sft_target": " Hello!"},
    H + "Same?" + A: {"responses": [" Yes."], "pairs": [], "sft_target": " Yes."},
    H + "Q" + A: {"responses": [" A1" + H + "more" + A + " A2", " B"], "pairs": [(0, 1)],
                  "sft_target": " A1" + H + "more" + A + " A2"},
    H + "Tell me" + A: {"responses": [" Sure.", " "], "pairs": [(0, 1)], "sft_target": " Sure."},
    H + "a" + A + " b" + H + "c" + A: {"responses": [" d", " e"], "pairs": [(0, 1)], "sft_target": " d"},
}


def test_hh_fixture_merges_prompts_and_handles_edge_cases():
    data = pdx.get_dataset("hh", "train", silent=True, path=str(FIXTURES / "hh_small.jsonl"))
    assert data == HH_SMALL_EXPECTED and list(data) == list(HH_SMALL_EXPECTED)


SHP_EXPECTED = {
    "train": {
        H + "How long to boil an egg?" + A: {  # ratio 3/4 < 2 row dropped; shared comment deduplicated
            "responses": [" Nine minutes.", " An hour.", " Seven minutes for soft."],
            "pairs": [(0, 1), (0, 2)], "sft_target": " Nine minutes."},
        H + "Salt in pasta water?" + A: {  # labels 0: B preferred; ratio exactly 2 is kept
            "responses": [" No.", " Yes, a lot."], "pairs": [(0, 1)], "sft_target": " No."},
        # 'Best knife?' has ratio 6/5 only, so the post disappears
        H + "Why is the sky blue?" + A: {  # SFT target: highest score (100), not the first preferred
            "responses": [" Rayleigh scattering.", " Because of the ocean.", " Blue light scatters more."],
            "pairs": [(0, 1), (2, 1)], "sft_target": " Blue light scatters more."},
    },
    "test": {H + "Is cast iron safe?" + A: {"responses": [" Yes.", " No."], "pairs": [(0, 1)],
                                            "sft_target": " Yes."}},
    "validation": {H + "Cold butter or warm?" + A: {"responses": [" Cold, for pastry.", " Warm."],
                                                    "pairs": [(0, 1)], "sft_target": " Cold, for pastry."}},
}


@pytest.mark.parametrize("split", ["train", "test", "validation"])
def test_shp_fixture_directory(split):
    data = pdx.get_dataset("shp", split, silent=True, path=str(FIXTURES / "shp"))
    assert data == SHP_EXPECTED[split] and list(data) == list(SHP_EXPECTED[split])


def test_shp_single_file():
    data = pdx.get_dataset("shp", "train", silent=True, path=str(FIXTURES / "shp" / "askculinary" / "train.json"))
    assert list(data) == [H + "How long to boil an egg?" + A, H + "Salt in pasta water?" + A]


SE_Q1 = H + "How do I reverse a list in Python?" + A
SE_EXPECTED_TRAIN = {  # order: np.random.default_rng(42).permutation(5) = [4, 2, 3, 1, 0]; row 4 is test
    H + "Pick one:\n\ntabs\n\nspaces" + A: {  # tie in pm_score: no pair, first answer is the SFT target
        "responses": [" Spaces.", " Tabs."], "pairs": [], "sft_target": " Spaces."},
    H + "Is <code>x < y</code> valid?" + A: {
        "responses": [" No", " Yes\nalways"], "pairs": [(1, 0)], "sft_target": " Yes\nalways"},
    H + "What is 2 + 2?\n\nAsking for a friend." + A: {
        "responses": [" 5", " 4"], "pairs": [(1, 0)], "sft_target": " 4"},
    SE_Q1: {  # answers 2 and 3 tie (pm_score 1): only pairs with answer 1
        "responses": [" Use slicing:\n\n<code>xs[::-1]\n</code>",
                      " Call <code>reversed(xs)</code> and wrap it in list.", " Write a loop & append."],
        "pairs": [(0, 1), (0, 2)], "sft_target": " Use slicing:\n\n<code>xs[::-1]\n</code>"},
}
SE_EXPECTED_TEST = {H + "Title\n\nBody text with spaces" + A: {
    "responses": [" One", " Two", " Three"], "pairs": [(1, 0), (2, 0), (2, 1)], "sft_target": " Three"}}


@pytest.mark.parametrize("html, text", [
    ("<p>Hello <em>big</em> world</p><p>Second</p>", "Hello big world\n\nSecond"),
    ("<pre><code>def f():\n    return 1\n</code></pre>", "<code>def f():\n    return 1\n</code>"),
    ("<p>Use <code>a &lt; b</code> &amp; more</p>", "Use <code>a < b</code> & more"),
    ("<ul><li>one</li><li>two</li></ul>", "one\n\ntwo"),
    ("plain   text\n", "plain text"),
    ("<p>unclosed <b>bold", "unclosed bold"),
])
def test_html_to_text(html, text):
    assert pdx.html_to_text(html) == text


def test_se_fixture_split_and_pairs():
    path = str(FIXTURES / "se" / "se_sample.jsonl")
    train = pdx.get_dataset("se", "train", silent=True, path=path)
    test = pdx.get_dataset("se", "test", silent=True, path=path)
    assert train == SE_EXPECTED_TRAIN and list(train) == list(SE_EXPECTED_TRAIN)
    assert test == SE_EXPECTED_TEST


def test_se_split_matches_datasets_shuffle():
    """Our offline split is the hub recipe: Dataset.shuffle(seed=42), first 1% is test."""
    shuffled = datasets.Dataset.from_dict({"i": list(range(500))}).shuffle(seed=42)["i"][:]
    assert list(pdx.se_split_indices(500, "test")) == shuffled[:5]
    assert list(pdx.se_split_indices(500, "train")) == shuffled[5:]


def test_se_answers_given_as_columns(tmp_path):
    """datasets' legacy Sequence-of-struct features yield answers as a dict of lists."""
    rows = jsonl_rows(FIXTURES / "se" / "se_sample.jsonl")
    for row in rows:
        row["answers"] = {key: [a[key] for a in row["answers"]] for key in row["answers"][0]}
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    assert pdx.get_dataset("se", "train", silent=True, path=str(path)) == SE_EXPECTED_TRAIN


def test_se_parquet_hub_layout(tmp_path):
    rows = jsonl_rows(FIXTURES / "se" / "se_sample.jsonl")
    for site, part in (("askubuntu.com", rows[:3]), ("cooking.stackexchange.com", rows[3:])):
        (tmp_path / "data" / site).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "data" / site / "train-00000-of-00001.parquet")
    assert pdx.get_dataset("se", "train", silent=True, path=str(tmp_path)) == SE_EXPECTED_TRAIN
    assert pdx.get_dataset("se", "test", silent=True, path=str(tmp_path)) == SE_EXPECTED_TEST


@pytest.mark.parametrize("name, hub_name, fixture, split, hub_split", [
    ("hh", "Anthropic/hh-rlhf", "hh_small.jsonl", "train", "train"),
    ("shp", "stanfordnlp/SHP", "shp/askculinary/validation.json", "validation", "validation"),
    ("se", "HuggingFaceH4/stack-exchange-preferences", "se/se_sample.jsonl", "test", "train"),
])
def test_hub_code_path(monkeypatch, name, hub_name, fixture, split, hub_split):
    """Without a path the loaders call datasets.load_dataset; feed it the fixture rows."""
    calls = []
    monkeypatch.setattr(pdx.utils, "hub_reachable", lambda: True)

    def fake_load_dataset(path, split=None, cache_dir=None):
        calls.append((path, split, cache_dir))
        return datasets.Dataset.from_list(jsonl_rows(FIXTURES / fixture))

    monkeypatch.setattr(pdx.datasets, "load_dataset", fake_load_dataset)
    from_hub = pdx.get_dataset(name, split, silent=True, cache_dir="/cache")
    assert calls == [(hub_name, hub_split, "/cache")]
    assert from_hub == pdx.get_dataset(name, split, silent=True, path=str(FIXTURES / fixture))


def test_hub_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network\nmore detail")
    monkeypatch.setattr(pdx.datasets, "load_dataset", offline)
    monkeypatch.setattr(pdx.utils, "hub_reachable", lambda: True)
    with pytest.raises(pdx.utils.ConfigError, match=r"^datasets=\[hh\]: could not load Anthropic/hh-rlhf from the "
                       r"Hugging Face hub \(ConnectionError: no network\); pass dataset_paths.hh=FILE \(a local copy"):
        pdx.get_dataset("hh", "train", silent=True)


def closed_port_endpoint() -> str:
    """http://127.0.0.1:PORT where nothing listens: connections are refused at once."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("name", ["hh", "shp", "se"])
@pytest.mark.parametrize("unreachable", ["HF_HUB_OFFLINE", "closed port"])
def test_unreachable_hub_fails_at_once_naming_dataset_paths(monkeypatch, tmp_path, name, unreachable):
    """No hub and no cached copy: one line within seconds (datasets alone retries ~25 s)."""
    import time
    from huggingface_hub import constants
    if unreachable == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        endpoint = closed_port_endpoint()
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(pdx.datasets.config, "HF_ENDPOINT", endpoint)
    pdx.utils.hub_reachable.cache_clear()
    start = time.monotonic()
    try:
        with pytest.raises(pdx.utils.ConfigError, match=rf"^datasets=\[{name}\]: the Hugging Face hub is "
                           rf"unreachable \(offline\) and no cached copy .* pass dataset_paths.{name}=FILE"):
            pdx.get_dataset(name, "test", silent=True, cache_dir=str(tmp_path))
        with pytest.raises(pdx.utils.ConfigError, match=f"dataset_paths.{name}=FILE"):
            pdx.check_hub_datasets(["synthetic", name], {name: None})
    finally:
        pdx.utils.hub_reachable.cache_clear()
    assert time.monotonic() - start < 10  # the probe gives up after 3 s; the rest is local
    assert not pdx.datasets.config.HF_HUB_OFFLINE  # datasets' own setting restored
    pdx.check_hub_datasets([name], {name: "local.jsonl"})  # a local copy needs no hub


# ---------------------------------------------------------------------------
# the user's own files (TRL format)
# ---------------------------------------------------------------------------

TRL_STANDARD_EXPECTED = {
    "Q: capital of France?\nA:": {"responses": [" Paris", " Rome", " Paris.", " Lyon"],
                                  "pairs": [(0, 1), (2, 3)], "sft_target": " Paris"},
    "The sky is": {"responses": [" blue.", " green."], "pairs": [(0, 1)], "sft_target": " blue."},
    H + "Hi" + A: {"responses": [" Hello", " Hey"], "pairs": [(0, 1)], "sft_target": " Hello"},
}
TRL_CONVERSATIONAL_EXPECTED = {
    "<|user|>What color is the sky?<|end|><|assistant|>": {
        "responses": ["Blue.<|end|>", "Green.<|end|>"], "pairs": [(0, 1)], "sft_target": "Blue.<|end|>"},
    "<|user|>Hi<|end|><|assistant|>": {  # implicit prompt: the shared leading message
        "responses": ["Hello!<|end|>", "Go away.<|end|>"], "pairs": [(0, 1)], "sft_target": "Hello!<|end|>"},
    "<|user|>2+2?<|end|><|assistant|>": {  # chosen/rejected repeat the prompt messages
        "responses": ["4<|end|>", "5<|end|>"], "pairs": [(0, 1)], "sft_target": "4<|end|>"},
    "<|system|>Be brief.<|end|><|user|>Name a fruit.<|end|><|assistant|>": {
        "responses": ["Apple.<|end|>", "I like fruits of many kinds.<|end|>"], "pairs": [(0, 1)],
        "sft_target": "Apple.<|end|>"},
}


def test_user_file_text_formats(tok):
    data = pdx.get_dataset(str(FIXTURES / "trl_standard.jsonl"), "train", silent=True, tokenizer=tok)
    assert data == TRL_STANDARD_EXPECTED and list(data) == list(TRL_STANDARD_EXPECTED)


def test_user_file_conversational(tok):
    data = pdx.get_dataset(str(FIXTURES / "trl_conversational.jsonl"), "train", silent=True, tokenizer=tok)
    assert data == TRL_CONVERSATIONAL_EXPECTED and list(data) == list(TRL_CONVERSATIONAL_EXPECTED)


@pytest.mark.parametrize("fixture", ["trl_standard.jsonl", "trl_conversational.jsonl"])
def test_user_file_storage_formats_agree(tmp_path, tok, fixture):
    rows = jsonl_rows(FIXTURES / fixture)
    expected = pdx.get_dataset(str(FIXTURES / fixture), "train", silent=True, tokenizer=tok)
    as_array = tmp_path / "rows.json"
    as_array.write_text(json.dumps(rows, indent=1))
    as_gz = tmp_path / "rows.jsonl.gz"
    as_gz.write_bytes(gzip.compress((FIXTURES / fixture).read_bytes()))
    as_parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), as_parquet)  # missing prompts become nulls
    as_parquet_gz = tmp_path / "rows.parquet.gz"
    as_parquet_gz.write_bytes(gzip.compress(as_parquet.read_bytes()))
    for path in (as_array, as_gz, as_parquet, as_parquet_gz):
        assert pdx.get_dataset(str(path), "test", silent=True, tokenizer=tok) == expected, path


def test_user_file_split_placeholder(tmp_path, tok):
    write_jsonl(tmp_path / "prefs_train.jsonl", [{"prompt": "P", "chosen": " a", "rejected": " b"}])
    write_jsonl(tmp_path / "prefs_test.jsonl", [{"prompt": "T", "chosen": " c", "rejected": " d"}])
    template = str(tmp_path / "prefs_{split}.jsonl")
    assert list(pdx.get_dataset(template, "train", silent=True)) == ["P"]
    assert list(pdx.get_dataset(template, "test", silent=True)) == ["T"]
    # without {split} a file serves every split
    plain = str(tmp_path / "prefs_train.jsonl")
    assert pdx.get_dataset(plain, "test", silent=True) == pdx.get_dataset(plain, "train", silent=True)
    # a registered name reading a local file follows the same rule
    write_jsonl(tmp_path / "hh_test.jsonl", jsonl_rows(FIXTURES / "hh_small.jsonl")[:1])
    write_jsonl(tmp_path / "hh_train.jsonl", jsonl_rows(FIXTURES / "hh_small.jsonl")[1:])
    assert len(pdx.get_dataset("hh", "test", silent=True, path=str(tmp_path / "hh_{split}.jsonl"))) == 1


def test_conversational_rows_need_a_chat_template():
    plain = make_tokenizer(with_template=False)
    path = FIXTURES / "trl_conversational.jsonl"
    for tokenizer in (None, plain):
        with pytest.raises(DatasetFormatError, match=re.escape(f"{path}, line 1") + ".*chat template"):
            pdx.get_dataset(str(path), "train", silent=True, tokenizer=tokenizer)


BAD_ROWS = [  # (loader, file name, lines, expected message fragments)
    ("user", "p.jsonl", ['{"prompt": "p", "chosen": " a", "rejected": " b"}', "{not json"],
     ["line 2", "not valid JSON"]),
    ("user", "p.jsonl", ['{"prompt": "p", "chosen": " a"}'], ["line 1", "missing column 'rejected'"]),
    ("user", "p.jsonl", ["", '{"prompt": "p", "chosen": 3, "rejected": " b"}'],
     ["line 2", "column 'chosen' must be str or list, got int"]),
    ("user", "p.jsonl", ["[1, 2]"], ["line 1", "expected a JSON object"]),
    ("user", "p.jsonl", ['{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}], '
                         '"rejected": [{"role": "assistant", "content": "b"}]}'], ["line 1", "'prompt', message 1"]),
    ("user", "p.jsonl", ['{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}'],
     ["line 1", "mixes text and message lists"]),
    ("user", "p.json", ['[{"prompt": "p", "chosen": " a", "rejected": " b"},', '{"prompt": "p", "rejected": " b"}]'],
     ["row 2", "missing column 'chosen'"]),
    ("user", "p.json", ['[{"prompt": "p",'], ["line 2", "not valid JSON"]),  # truncated: fails at the end
    ("hh", "hh.jsonl", [json.dumps({"chosen": H + "a" + A + " b", "rejected": H + "a" + A + " c"}),
                        json.dumps({"chosen": H + "a" + A + " b"})], ["line 2", "missing column 'rejected'"]),
    ("hh", "hh.jsonl", ['{"chosen": "Hello there", "rejected": "Hello you"}'], ["line 1", "share no"]),
    ("shp", "train.json", ['{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "score_A": 9, '
                           '"score_B": 1, "labels": 2}'], ["line 1", "'labels' must be 0 or 1"]),
    ("shp", "train.json", ['{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "score_A": "9", '
                           '"score_B": 1, "labels": 1}'], ["line 1", "'score_A' must be int or float, got str"]),
    ("se", "se.jsonl", ['{"question": "<p>q</p>", "answers": "none"}'], ["line 1", "'answers' must be list or dict"]),
    ("se", "se.jsonl", ['{"question": "<p>q</p>", "answers": [{"text": "a", "pm_score": 1}, {"text": "b"}]}'],
     ["line 1, answer 2", "missing column 'pm_score'"]),
]


@pytest.mark.parametrize("loader, file_name, lines, fragments", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, tok, loader, file_name, lines, fragments):
    path = tmp_path / file_name
    path.write_text("\n".join(lines) + "\n")
    name, kwargs = (str(path), {}) if loader == "user" else (loader, {"path": str(path)})
    with pytest.raises(DatasetFormatError) as error:
        pdx.get_dataset(name, "train", silent=True, tokenizer=tok, **kwargs)
    for fragment in [str(path)] + fragments:
        assert fragment in str(error.value)


def test_bad_parquet_row_and_bad_gzip(tmp_path):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}] * 2 + [{"prompt": "p", "chosen": None, "rejected": " b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    expected = r"p\.parquet, row 3: column .chosen. must be str or list, got NoneType"
    with pytest.raises(DatasetFormatError, match=expected):
        pdx.get_dataset(str(tmp_path / "p.parquet"), "train", silent=True)
    (tmp_path / "p.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetFormatError, match=r"p\.jsonl\.gz: cannot read"):
        pdx.get_dataset(str(tmp_path / "p.jsonl.gz"), "train", silent=True)


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

def test_registry_and_unknown_names(tmp_path):
    assert pdx.DATASETS == {"hh": pdx.get_hh, "shp": pdx.get_shp, "se": pdx.get_se, "synthetic": pdx.get_synthetic}
    with pytest.raises(ValueError, match="unknown dataset 'hhh'; known names: hh, se, shp, synthetic.*local"):
        pdx.get_dataset("hhh", "train")
    # an unregistered name with a path reads that path as a TRL-format preference file
    assert pdx.get_dataset("mine", "train", silent=True, path=str(FIXTURES / "trl_standard.jsonl")) == \
        TRL_STANDARD_EXPECTED
    with pytest.raises(ValueError, match="does not exist"):
        pdx.get_dataset(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(ValueError, match="no data files whose name contains 'validation'"):
        pdx.get_dataset("hh", "validation", path=str(FIXTURES / "shp" / "askphysics"))
    with pytest.raises(ValueError, match="takes no path"):
        pdx.get_dataset("synthetic", "train", path=str(tmp_path))


# ---------------------------------------------------------------------------
# synthetic dataset
# ---------------------------------------------------------------------------

def right_answer(question: str) -> str:
    """Independent re-implementation of each synthetic task."""
    task, _, args = question.partition(": ")
    if task == "Repeat the words":
        return " " + args
    if task == "Reverse the letters":
        return " " + " ".join(args.split()[::-1])
    if task == "Sort the digits":
        return " " + " ".join(sorted(args.split()))
    a, b = re.fullmatch(r"What is (\d) \+ (\d)\?", question).groups()
    return f" {int(a) + int(b)}"


def test_synthetic_dataset():
    train, test = (pdx.get_dataset("synthetic", split, silent=True) for split in ("train", "test"))
    assert (len(train), len(test)) == (6000, 400)
    assert not set(train) & set(test)  # held-out prompts
    synthetic_data._SYNTHETIC_CACHE.clear()  # regenerate from scratch: same data, independent of global RNG state
    assert pdx.get_dataset("synthetic", "test", silent=True) == test
    tasks = set()
    for data in (train, test):
        for prompt, entry in data.items():
            question = prompt[len(H):-len(A)]
            assert prompt == H + question + A
            right, wrong = entry["responses"]
            assert entry["pairs"] == [(0, 1)] and entry["sft_target"] == right == right_answer(question)
            assert wrong.startswith(" ") and len(right.split()) <= 6
            assert wrong.split()[0] != right.split()[0]  # wrong from the first token: easy to learn
            tasks.add(question.split(":")[0].split()[0])
    assert tasks == {"Repeat", "Reverse", "Sort", "What"}
    corpus = pdx.synthetic_corpus()
    assert len(corpus) == 2 * 6400 and corpus[0] == next(iter(train)) + train[next(iter(train))]["responses"][0]


# ---------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------

@pytest.fixture(params=["synthetic", "hh_real"])
def source(request):
    """Batching inputs: the synthetic test split, and the real HH rows when present."""
    if request.param == "hh_real":
        if not HH_AVAILABLE:
            pytest.skip("../shared/data/hh is not present")
        return {"names": ["hh"], "paths": {"hh": str(HH_DIR)}, "split": "test", "mode": "keep_end"}
    return {"names": ["synthetic"], "paths": None, "split": "test", "mode": "keep_start"}


def load_source(source):
    name = source["names"][0]
    return pdx.get_dataset(name, source["split"], silent=True, path=(source["paths"] or {}).get(name))


def first_pair(source):
    data = load_source(source)
    prompt, entry = next((p, e) for p, e in data.items() if e["pairs"])
    i, j = entry["pairs"][0]
    return prompt, entry["responses"][i], entry["responses"][j]


def test_tokenize_element_fields_and_label_masking(tok, source):
    prompt, chosen, rejected = first_pair(source)
    element = pdx.tokenize_batch_element(prompt, chosen, rejected, source["mode"], tok, 100000, 50000)
    assert set(element) == TOKEN_KEYS | TEXT_KEYS
    assert (element["prompt"], element["chosen"], element["rejected"]) == (prompt, prompt + chosen, prompt + rejected)
    assert (element["chosen_response_only"], element["rejected_response_only"]) == (chosen, rejected)
    p = ids(tok, prompt)
    assert element["prompt_input_ids"] == p and element["prompt_attention_mask"] == [1] * len(p)
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        r = ids(tok, response) + [tok.eos_token_id]
        assert element[f"{side}_input_ids"] == p + r
        assert element[f"{side}_labels"] == [-100] * len(p) + r
        assert element[f"{side}_attention_mask"] == [1] * (len(p) + len(r))


def test_truncation_boundaries(tok, source):
    prompt, chosen, rejected = first_pair(source)
    p = ids(tok, prompt)
    longer = max(len(ids(tok, chosen)), len(ids(tok, rejected))) + 1  # + EOS
    keep = len(p) - 2
    assert keep > 0
    exact = pdx.tokenize_batch_element(prompt, chosen, rejected, "keep_end", tok, len(p) + longer, keep)
    assert exact["prompt_input_ids"] == p  # exactly max_length: untouched
    for mode, kept in (("keep_end", p[-keep:]), ("keep_start", p[:keep])):
        over = pdx.tokenize_batch_element(prompt, chosen, rejected, mode, tok, len(p) + longer - 1, keep)
        assert over["prompt_input_ids"] == kept  # one over: prompt cut to max_prompt_length
        assert over["chosen_input_ids"] == kept + ids(tok, chosen) + [tok.eos_token_id]  # responses intact
        assert over["chosen_labels"][:keep] == [-100] * keep
    # still too long after the prompt cut: responses cut to max_length - max_prompt_length
    max_length = keep + longer - 1
    cut = pdx.tokenize_batch_element(prompt, chosen, rejected, "keep_end", tok, max_length, keep)
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        r = (ids(tok, response) + [tok.eos_token_id])[:max_length - keep]
        assert cut[f"{side}_input_ids"] == p[-keep:] + r and len(cut[f"{side}_input_ids"]) <= max_length
        assert cut[f"{side}_labels"] == [-100] * keep + r


def test_eos_not_doubled_and_bad_settings(tok):
    element = pdx.tokenize_batch_element("Q", " a<|endoftext|>", " b", "keep_start", tok, 64, 8)
    assert element["chosen_input_ids"][-2:] != [0, 0] and element["chosen_input_ids"][-1] == 0
    with pytest.raises(ValueError, match="unknown truncation_mode 'keep_middle'"):
        pdx.tokenize_batch_element("Q", " a", " b", "keep_middle", tok, 64, 8)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        pdx.tokenize_batch_element("Q", " a", " b", "keep_end", tok, 64, 64)


# ---------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------

def batches(source, tok, cache, **kwargs):
    settings = dict(split=source["split"], batch_size=8, n_epochs=1, max_length=256, max_prompt_length=128,
                    seed=0, silent=True, cache_dir=cache, paths=source["paths"])
    settings.update(kwargs)
    return list(pdx.get_batch_iterator(source["names"], tok, **settings))


def order(batch_list):
    return [tuple(b["chosen"]) + tuple(b["rejected"]) for b in batch_list]


def n_elements(source, sft_mode=False):
    data = load_source(source)
    return len(data) if sft_mode else sum(len(e["pairs"]) for e in data.values())


def test_collate_pads_right_with_pad_id_per_key(tok):
    short = pdx.tokenize_batch_element("Hi", " a", " bbb bbb bbb", "keep_start", tok, 64, 8)
    long = pdx.tokenize_batch_element("Hello there friend", " aaaa aaaa", " b", "keep_start", tok, 64, 8)
    batch = pdx.get_collate_fn(tok)([short, long])
    assert set(batch) == TOKEN_KEYS | TEXT_KEYS
    for key in TOKEN_KEYS:
        width = max(len(short[key]), len(long[key]))  # each key to its own longest, not a shared one
        assert batch[key].shape == (2, width) and batch[key].dtype == torch.long
        pad = {"input_ids": tok.pad_token_id, "labels": -100, "attention_mask": 0}[key.split("_", 1)[1]]
        for row, element in enumerate((short, long)):
            n = len(element[key])
            assert batch[key][row, :n].tolist() == element[key]  # right padding
            assert batch[key][row, n:].tolist() == [pad] * (width - n)
    assert batch["chosen"] == [short["chosen"], long["chosen"]]


def test_tokenizer_without_pad_token_is_rejected(cache):
    with pytest.raises(ValueError, match="no pad token"):
        pdx.get_batch_iterator(["synthetic"], make_tokenizer(with_pad=False), split="test", n_epochs=1, cache_dir=cache)


def test_batches_are_padded_with_pad_id(tok, cache, source):
    for batch in batches(source, tok, cache)[:3]:
        lengths = batch["chosen_attention_mask"].sum(1)
        for row, n in enumerate(lengths.tolist()):
            assert (batch["chosen_input_ids"][row, n:] == tok.pad_token_id).all()
            assert (batch["chosen_labels"][row, n:] == -100).all()
        assert batch["chosen_input_ids"].shape[1] == lengths.max()  # no extra padding
        assert batch["chosen_input_ids"].shape[1] <= 256


def test_seeded_order_and_epoch_reshuffle(tok, cache, source):
    per_epoch = n_elements(source) // 8
    seed0 = batches(source, tok, cache, n_epochs=2)
    assert len(seed0) == 2 * per_epoch
    assert order(seed0) == order(batches(source, tok, cache, n_epochs=2))  # same seed, same order
    assert order(seed0) != order(batches(source, tok, cache, n_epochs=2, seed=1))
    first, second = order(seed0[:per_epoch]), order(seed0[per_epoch:])
    assert first != second  # each epoch reshuffles ...
    def flat(part):
        return sorted(x for b in part for x in b)
    assert len(set(flat(first)) ^ set(flat(second))) < 2 * 8 * 2  # ... the same data (bar the dropped tail)
    unshuffled = batches(source, tok, cache, shuffle=False)
    assert order(unshuffled) == order(batches(source, tok, cache, shuffle=False, seed=5))


def test_n_examples_and_n_epochs(tok, cache, source):
    n = n_elements(source)
    assert len(batches(source, tok, cache, n_epochs=1)) == n // 8  # trailing partial batch dropped
    assert len(batches(source, tok, cache, n_epochs=None, n_examples=20)) == math.ceil(20 / 8)
    assert len(batches(source, tok, cache, n_epochs=None, n_examples=n + 20)) == math.ceil((n + 20) / 8)
    for bad in ({"n_epochs": None}, {"n_epochs": 1, "n_examples": 8}):
        with pytest.raises(ValueError, match="exactly one of n_epochs and n_examples"):
            batches(source, tok, cache, **bad)
    with pytest.raises(DatasetFormatError, match="fewer than one batch"):
        batches(source, tok, cache, batch_size=n + 1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        batches(source, tok, cache, seed=-1)


def test_group_by_length(tok, cache, source):
    grouped = batches(source, tok, cache, group_by_length=True)
    assert len(grouped) == n_elements(source) // 8
    spans = [(min(t), max(t)) for t in
             ((b["chosen_attention_mask"].sum(1) + b["rejected_attention_mask"].sum(1)).tolist() for b in grouped)]
    # fewer elements than one 50-batch chunk: the epoch is sorted by length, so batch ranges do not overlap
    ranked = sorted(spans, key=lambda s: (-s[1], -s[0]))
    assert all(upper[0] >= lower[1] for upper, lower in zip(ranked, ranked[1:]))
    assert spans != ranked  # batch order is shuffled, not longest-first
    assert order(grouped) == order(batches(source, tok, cache, group_by_length=True))
    assert order(grouped) != order(batches(source, tok, cache, group_by_length=True, seed=3))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_skip_batches_resumes_exactly(tok, cache, source, group_by_length):
    full = batches(source, tok, cache, n_epochs=2, group_by_length=group_by_length)
    per_epoch = len(full) // 2
    for skip in (0, 3, per_epoch + 2, len(full)):
        resumed = batches(source, tok, cache, n_epochs=2, group_by_length=group_by_length, skip_batches=skip)
        assert len(resumed) == len(full) - skip
        for a, b in zip(resumed, full[skip:]):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_sft_mode(tok, cache, source):
    sft = batches(source, tok, cache, sft_mode=True, batch_size=4, shuffle=False)
    assert len(sft) == n_elements(source, sft_mode=True) // 4
    data = load_source(source)
    first = sft[0]
    assert set(first) == TOKEN_KEYS | TEXT_KEYS  # rejected_* kept, holding the SFT target too
    assert first["prompt"] == list(data)[:4]
    assert first["chosen_response_only"] == [data[p]["sft_target"] for p in list(data)[:4]]
    assert torch.equal(first["chosen_input_ids"], first["rejected_input_ids"])


def test_several_datasets_and_truncation_modes(tok, cache):
    user_file = str(FIXTURES / "trl_standard.jsonl")
    out = list(pdx.get_batch_iterator(["synthetic", user_file], tok, split="test", batch_size=1, shuffle=False,
                                      n_epochs=1, silent=True, cache_dir=cache))
    assert len(out) == 400 + 4
    assert [b["prompt"][0] for b in out[-4:]] == ["Q: capital of France?\nA:"] * 2 + ["The sky is", H + "Hi" + A]
    assert pdx.truncation_mode_for("hh") == "keep_end" and pdx.truncation_mode_for(user_file) == "keep_end"
    assert pdx.truncation_mode_for("shp") == "keep_start"  # as in the DPO repository


def test_long_prompts_of_user_files_keep_their_end_and_are_counted(tmp_path, tok, capsys):
    """A user's long prompt keeps its last max_prompt_length tokens (the question, and for chat rows
    the template's assistant header), and start-up says how many prompts and responses were cut."""
    filler = " ".join(["sort c a b"] * 60)
    text_rows = [{"prompt": filler + " QUESTION: what is 2+2?", "chosen": " 4", "rejected": " 5"},
                 {"prompt": "Short?", "chosen": " yes", "rejected": " no"}]
    chat_rows = [{"prompt": [{"role": "user", "content": filler + " Which is larger?"}],
                  "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": " ".join(["b"] * 80)}]}]
    settings = dict(split="train", batch_size=1, shuffle=False, n_epochs=1, max_length=64,
                    max_prompt_length=24, cache_dir=str(tmp_path / "cache"))
    text = write_jsonl(tmp_path / "text.jsonl", text_rows)
    long, short = pdx.get_batch_iterator([str(text)], tok, **settings)
    question = ids(tok, " QUESTION: what is 2+2?")
    assert long["prompt_input_ids"][0].tolist()[-len(question):] == question
    assert (long["prompt_truncated"], short["prompt_truncated"]) == ([1], [0])
    assert capsys.readouterr().out.count("1 of 2 prompts cut to their last 24 tokens") == 1
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows)
    (element,) = pdx.get_batch_iterator([str(chat)], tok, **settings)
    end = ids(tok, " larger?<|end|><|assistant|>")  # the question, then the assistant header whole
    assert element["prompt_input_ids"][0].tolist()[-len(end):] == end
    assert end[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert element["prompt_truncated"] == [1] and element["response_truncated"] == [1]
    out = capsys.readouterr().out
    assert "1 of 1 prompts cut" in out and "1 of 1 examples with responses cut to 40 tokens" in out


def test_tokenisation_is_cached(tmp_path, tok, monkeypatch):
    settings = dict(split="test", batch_size=8, n_epochs=1, silent=True, cache_dir=str(tmp_path))
    first = list(pdx.get_batch_iterator(["synthetic"], tok, **settings))
    cached = list((tmp_path / "tokenized").glob("*.arrow"))
    assert len(cached) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer was called although the cache holds this dataset")

    monkeypatch.setattr(pdx, "_token_ids", no_tokenizing)
    second = list(pdx.get_batch_iterator(["synthetic"], tok, **settings))
    assert order(second) == order(first)
    assert list((tmp_path / "tokenized").glob("*.arrow")) == cached
    with pytest.raises(AssertionError, match="tokenizer was called"):  # other lengths: a new cache entry
        pdx.get_batch_iterator(["synthetic"], tok, max_length=300, **settings)



# ---------------------------------------------------------------------------
# CSV files, unsupported formats, empty and degenerate data (issue 11 item 4, issue 12 items 11-13)
# ---------------------------------------------------------------------------

# tests/fixtures/trl_standard.csv, worked out by hand: CRLF records, a quoted line break, doubled
# quotes, commas inside quotes, UTF-8 text, and one row whose chosen equals its rejected.
TRL_CSV_EXPECTED = {
    "Q: capital of France?\nA:": {"responses": [" Paris", " Rome", " Paris.", " Lyon"],
                                  "pairs": [(0, 1), (2, 3)], "sft_target": " Paris"},
    'Say "hi", politely:': {"responses": [" Hi, friend!", " hi"], "pairs": [(0, 1)], "sft_target": " Hi, friend!"},
    "Café?": {"responses": [" Oui.", " Non."], "pairs": [(0, 1)], "sft_target": " Oui."},
    "Same?": {"responses": [" yes"], "pairs": [], "sft_target": " yes"},  # the pair itself is dropped
}


def test_csv_file_reads_like_jsonl(tmp_path):
    csv_bytes = (FIXTURES / "trl_standard.csv").read_bytes()
    data = pdx.get_dataset(str(FIXTURES / "trl_standard.csv"), "train", silent=True)
    assert data == TRL_CSV_EXPECTED and list(data) == list(TRL_CSV_EXPECTED)
    # the same rows as JSON Lines load identically
    as_jsonl = write_jsonl(tmp_path / "same.jsonl", [
        {"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
            ("Q: capital of France?\nA:", " Paris", " Rome"), ("Q: capital of France?\nA:", " Paris.", " Lyon"),
            ('Say "hi", politely:', " Hi, friend!", " hi"), ("Café?", " Oui.", " Non."), ("Same?", " yes", " yes")]])
    assert pdx.get_dataset(str(as_jsonl), "train", silent=True) == data
    # a BOM (Excel's "CSV UTF-8"), gzip, and a {split} pattern
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + csv_bytes)
    (tmp_path / "rows.csv.gz").write_bytes(gzip.compress(csv_bytes))
    (tmp_path / "prefs_train.csv").write_bytes(csv_bytes)
    (tmp_path / "prefs_test.csv").write_text("prompt,chosen,rejected\nT, c, d\n")
    for path in (tmp_path / "bom.csv", tmp_path / "rows.csv.gz"):
        assert pdx.get_dataset(str(path), "test", silent=True) == data, path
    template = str(tmp_path / "prefs_{split}.csv")
    assert pdx.get_dataset(template, "train", silent=True) == data
    assert pdx.get_dataset(template, "test", silent=True) == {
        "T": {"responses": [" c", " d"], "pairs": [(0, 1)], "sft_target": " c"}}
    # implicit prompt: no prompt column, the prompt is the common prefix
    (tmp_path / "implicit.csv").write_text("chosen,rejected\nThe sky is blue.,The sky is green.\n")
    assert pdx.get_dataset(str(tmp_path / "implicit.csv"), "train", silent=True) == \
        {"The sky is": {"responses": [" blue.", " green."], "pairs": [(0, 1)], "sft_target": " blue."}}


def test_csv_file_trains_through_the_batch_iterator(tmp_path, tok):
    out = list(pdx.get_batch_iterator([str(FIXTURES / "trl_standard.csv")], tok, split="train", batch_size=1,
                                      shuffle=False, n_epochs=1, silent=True, cache_dir=str(tmp_path)))
    assert [(b["prompt"][0], b["chosen_response_only"][0], b["rejected_response_only"][0]) for b in out] == [
        ("Q: capital of France?\nA:", " Paris", " Rome"), ("Q: capital of France?\nA:", " Paris.", " Lyon"),
        ('Say "hi", politely:', " Hi, friend!", " hi"), ("Café?", " Oui.", " Non.")]


BAD_CSV = [  # (file text, expected fragments); line numbers are 1-based physical lines
    ('prompt,chosen,rejected\n"multi\nline", a, b\np, only two\n', ["line 4", "has 2 fields but the header names 3"]),
    ("prompt,chosen\np, a\n", ["line 2", "missing column 'rejected'"]),
    ("prompt,chosen,chosen\np,a,b\n", ["line 1", "repeats column 'chosen'"]),
    ("prompt,chosen,rejected\n", ["holds no rows", "header row"]),
    ('prompt,chosen,rejected\n"p, a, b\n', ["not valid CSV"]),
    (b"prompt,chosen,rejected\np,\xff,b\n", ["not UTF-8"]),
]


@pytest.mark.parametrize("text, fragments", BAD_CSV)
def test_bad_csv_names_file_and_line(tmp_path, text, fragments):
    path = tmp_path / "p.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DatasetFormatError) as error:
        pdx.get_dataset(str(path), "train", silent=True)
    message = str(error.value)
    assert "\n" not in message
    for fragment in [str(path)] + fragments:
        assert fragment in message


def test_unsupported_file_types_are_refused_at_validation(tmp_path):
    import train
    from conftest import compose
    from utils import ConfigError
    for name in ("prefs.txt", "prefs.xlsx", "prefs.tsv.gz"):
        (tmp_path / name).write_text("prompt,chosen,rejected\np,a,b\n")
    cases = [([f"datasets=[{tmp_path}/prefs.txt]"], f"datasets: {tmp_path}/prefs.txt: unsupported"),
             ([f"datasets=['{tmp_path}/prefs_{{split}}.xlsx']"], f"datasets: {tmp_path}/prefs_train.xlsx: unsupported"),
             (["datasets=[hh]", f"dataset_paths.hh={tmp_path}/prefs.tsv.gz"],
              f"dataset_paths.hh: {tmp_path}/prefs.tsv.gz")]
    (tmp_path / "prefs_train.xlsx").write_text("x")
    (tmp_path / "prefs_test.xlsx").write_text("x")
    for overrides, fragment in cases:
        with pytest.raises(ConfigError) as error:
            train.validate_datasets(compose(overrides))
        message = str(error.value)
        assert fragment in message and ".jsonl, .json, .parquet or .csv (each optionally .gz)" in message
    # supported files, and a user-named dataset given by dataset_paths, pass validation
    (tmp_path / "ok.csv.gz").write_bytes(gzip.compress(b"prompt,chosen,rejected\np,a,b\n"))
    train.validate_datasets(compose([f"datasets=[{tmp_path}/ok.csv.gz]"]))
    train.validate_datasets(compose(["datasets=[mine]", f"+dataset_paths.mine={tmp_path}"]))
    # the loaders refuse the same files
    with pytest.raises(DatasetFormatError, match=r"prefs\.txt: unsupported data file type; use \.jsonl"):
        pdx.get_dataset(str(tmp_path / "prefs.txt"), "train", silent=True)
    with pytest.raises(DatasetFormatError, match=r"prefs\.tsv\.gz: unsupported data file type"):
        pdx.get_dataset("hh", "train", silent=True, path=str(tmp_path / "prefs.tsv.gz"))


def test_empty_and_degenerate_data_name_the_file(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{empty}: the data file holds no rows")):
        pdx.get_dataset(str(empty), "train", silent=True)
    same = write_jsonl(tmp_path / "same.jsonl",
                       [{"prompt": f"p{k}", "chosen": " a", "rejected": " a"} for k in range(3)])
    with pytest.raises(DatasetFormatError) as error:
        pdx.get_batch_iterator([str(same)], tok, n_epochs=1, silent=True, cache_dir=str(tmp_path / "c"))
    assert str(error.value) == (f"{same}: no preference pairs to train on in the train split of '{same}' "
                                "(all 3 pairs dropped: 3 with chosen equal to rejected).")
    # SFT needs no pairs: the same file gives one element per prompt
    sft = list(pdx.get_batch_iterator([str(same)], tok, n_epochs=1, sft_mode=True, silent=True,
                                      cache_dir=str(tmp_path / "c")))
    assert len(sft) == 3
    (tmp_path / "nothing").mkdir()
    expected = f"{tmp_path}/nothing: the dataset directory holds no data files"
    with pytest.raises(DatasetFormatError, match=re.escape(expected)):
        pdx.get_dataset("hh", "train", silent=True, path=str(tmp_path / "nothing"))
    # SHP: every pair below the score-ratio filter leaves no prompt
    shp = write_jsonl(tmp_path / "train.jsonl", [{"history": "h", "human_ref_A": "a", "human_ref_B": "b",
                                                  "score_A": 3, "score_B": 2, "labels": 1}])
    with pytest.raises(DatasetFormatError, match=re.escape(f"{shp}: no usable prompts in the train split of 'shp' "
                                                           "(all 1 pairs dropped: 1 with a score ratio below 2)")):
        pdx.get_dataset("shp", "train", silent=True, path=str(shp))


def test_directory_without_the_split_says_what_was_looked_for(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}])
    for name in ("hh", "mine"):
        with pytest.raises(DatasetFormatError) as error:
            pdx.get_dataset(name, "test", silent=True, path=str(tmp_path))
        message = str(error.value)
        for fragment in (str(tmp_path), "whose name contains 'test'", "for the test split",
                         "'{split}' in the path (it is replaced by the split name"):
            assert fragment in message, (name, message)
        assert "unknown dataset" not in message
    # a user directory reads only its split's files: test rows never leak into train
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q", "chosen": " c", "rejected": " d"}])
    assert list(pdx.get_dataset("mine", "train", silent=True, path=str(tmp_path))) == ["p"]
    assert list(pdx.get_dataset("mine", "test", silent=True, path=str(tmp_path))) == ["q"]


# ---------------------------------------------------------------------------
# dropped pairs are reported (issue 12 item 12)
# ---------------------------------------------------------------------------

def test_dropped_pairs_are_counted_and_reported_once(tmp_path, tok, capsys):
    rows = [{"prompt": f"p{k}", "chosen": " a", "rejected": " b"} for k in range(6)]
    rows[1]["rejected"] = rows[4]["rejected"] = " a"
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    settings = dict(split="train", batch_size=2, n_epochs=1, cache_dir=str(tmp_path / "c"))
    list(pdx.get_batch_iterator([str(path)], tok, silent=True, **settings))
    assert capsys.readouterr().out == ""  # other ranks: silent
    list(pdx.get_batch_iterator([str(path)], tok, silent=False, **settings))
    lines = [line for line in capsys.readouterr().out.splitlines() if "kept" in line]
    assert lines == [f"{path} [train]: kept 4 of 6 pairs (2 with chosen equal to rejected)"]
    # SHP's ratio filter and equal pairs, counted independently from the fixture's scores
    shp_rows = [row for file in sorted((FIXTURES / "shp").rglob("*train*")) for row in jsonl_rows(file)]
    below = sum(max(r["score_A"], r["score_B"]) / min(r["score_A"], r["score_B"]) < 2 for r in shp_rows)
    data = pdx.get_dataset("shp", "train", silent=True, path=str(FIXTURES / "shp"))
    assert below > 0 and data.offered == len(shp_rows)
    assert data.dropped.get("with a score ratio below 2") == below
    kept = sum(len(entry["pairs"]) for entry in data.values())
    assert kept == len(shp_rows) - sum(data.dropped.values())
    assert data.kept_summary("shp") == (f"shp: kept {kept:,} of {len(shp_rows):,} pairs ("
                                        + ", ".join(f"{n} {r}" for r, n in data.dropped.items()) + ")")


# ---------------------------------------------------------------------------
# a damaged tokenisation cache is rebuilt (issue 12 item 6)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_checksum"])
def test_damaged_tokenisation_cache_is_rebuilt(tmp_path, tok, capsys, damage):
    settings = dict(split="test", batch_size=8, n_epochs=1, shuffle=False, silent=True, cache_dir=str(tmp_path))
    first = list(pdx.get_batch_iterator(["synthetic"], tok, **settings))
    [arrow] = (tmp_path / "tokenized").glob("*.arrow")
    checksum = arrow.with_name(arrow.name + ".sha256")
    assert checksum.is_file()
    raw = arrow.read_bytes()
    if damage == "truncate":  # a run killed while writing the cache
        arrow.write_bytes(raw[:len(raw) // 2])
    elif damage == "flip_byte":  # same size, one token id changed
        middle = len(raw) // 2
        arrow.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1:])
    else:  # a cache written without its completion marker
        checksum.unlink()
    capsys.readouterr()
    again = list(pdx.get_batch_iterator(["synthetic"], tok, **settings))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(arrow) in warnings[0] and "rebuilding" in warnings[0]
    assert arrow.read_bytes() == raw and checksum.is_file()  # rebuilt byte for byte
    assert len(again) == len(first)
    for a, b in zip(again, first):
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    list(pdx.get_batch_iterator(["synthetic"], tok, **settings))
    assert "warning" not in capsys.readouterr().out  # intact now: used as is


# ---------------------------------------------------------------------------
# an evaluation split smaller than one batch (issue 11 item 10)
# ---------------------------------------------------------------------------

def test_split_smaller_than_a_batch_names_the_setting(tmp_path, tok):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"p{k}", "chosen": " a", "rejected": " b"}
                                                   for k in range(5)])
    settings = dict(batch_size=16, n_epochs=1, silent=True, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetFormatError) as error:
        pdx.get_batch_iterator([str(path)], tok, split="test", **settings)
    assert str(error.value) == (f"the test split of {path} has 5 examples, fewer than one batch of 16, so no "
                                "full batch can be formed; set eval_batch_size (n_eval_examples then counts "
                                "whole batches of it) to at most 5, or add data.")
    with pytest.raises(DatasetFormatError, match="set batch_size to at most 5"):
        pdx.get_batch_iterator([str(path)], tok, split="train", **settings)


def test_bad_data_is_one_line_from_train_py(tmp_path):
    """train.py prints DatasetFormatError as one `error:` line, exit status 2, no run directory left."""
    from conftest import FAST, run_subprocess
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,chosen,rejected\n")
    rows = "".join(f"p{k}, a, b\n" for k in range(40))
    (tmp_path / "prefs_train.csv").write_text("prompt,chosen,rejected\n" + rows)
    (tmp_path / "prefs_test.csv").write_text("prompt,chosen,rejected\n" + rows[:3 * 9])  # 3 rows
    cases = [(f"datasets=[{empty}]", f"error: {empty}: the data file holds no rows"),
             (f"datasets=['{tmp_path}/prefs_{{split}}.csv']",
              "error: the test split of " + str(tmp_path / "prefs_{split}.csv") + " has 3 examples, fewer than "
              "one batch of 16, so no full batch can be formed; set eval_batch_size")]
    for dataset, expected in cases:
        run_dir = tmp_path / "run"
        result = run_subprocess([*FAST, dataset, f"local_run_dir={run_dir}"], timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-2000:]
        assert not run_dir.exists()


def test_a_loader_returning_a_plain_dict_still_works(monkeypatch):
    entry = {"responses": [" a", " b"], "pairs": [(0, 1)], "sft_target": " a"}
    monkeypatch.setitem(pdx.DATASETS, "plain", lambda split, **kwargs: {"P": dict(entry)})
    data = pdx.get_dataset("plain", "train", silent=True)
    assert data == {"P": entry} and data.kept_summary("plain") == "plain: kept 1 of 1 pairs"
