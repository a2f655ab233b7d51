"""Preference datasets: loading, tokenisation and batching for DPO-style training.

Every loader returns the same structure, keyed by prompt text in first-seen order::

    {prompt: {'responses': [str, ...],
              'pairs': [(i_preferred, j_dispreferred), ...],
              'sft_target': str}}

(a ``LoadedData``, which also counts the pairs loading dropped and why), so that
``prompt + responses[i]`` is the full text of a response.  Loaders are listed
in ``DATASETS``; adding a named dataset means writing one function with the signature
``loader(split, silent=False, cache_dir=None, path=None, tokenizer=None)`` and adding
one entry there.

Data sources:

* ``path=None``: the Hugging Face hub copy (``datasets.load_dataset``; its cached copy when the
  hub is unreachable, else one ``utils.ConfigError`` line naming ``dataset_paths.NAME``).
* ``path=<directory>``: a local copy laid out like the hub repository; files whose name
  contains the split as a word (``test.jsonl.gz``, ``helpful-base-test.jsonl``) are read.
* ``path=<file>``: one ``.jsonl``/``.json``/``.parquet``/``.csv`` file (optionally ``.gz``)
  in the hub's row schema.  A file has no split of its own, so the same file serves every
  split unless the path contains ``{split}``, which is replaced by the split name.
* ``get_dataset('<file path>', split, tokenizer=...)``: the user's own data in TRL's
  preference format (``prompt``/``chosen``/``rejected`` as text or chat messages).

Files are read by ``data_files``.  Malformed rows, empty files and data with no pair left
raise ``DatasetFormatError`` naming the file, the 1-based line (JSON Lines, CSV) or row
(JSON arrays, parquet) and the problem.
"""
import contextlib
import itertools
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch
from filelock import FileLock

import data_files
import utils
import vision
# re-exported: callers and tests import these from here
from data_files import (ASSISTANT_MARKER, HUMAN_MARKER, SUPPORTED_FORMATS, DatasetFormatError,  # noqa: F401
                        UnpairedDataError,
                        _field, data_suffix, is_unpaired_row, preference_row_to_text, read_rows,
                        resolve_data_files, html_to_text, split_hh_transcripts, unpaired_row_to_text,
                        unsupported_format_message)
from kto_cpo_orpo import kto_weight_advice, mismatched_order
from synthetic_data import SYNTHETIC_SIZES, synthetic_corpus, synthetic_split  # noqa: F401

SHP_MIN_SCORE_RATIO = 2.0      # the DPO paper's SHP filter: keep pairs whose scores differ 2x
SE_SPLIT_SEED = 42             # seed the DPO code uses to carve a test split out of SE 'train'
SE_TEST_FRACTION = 0.01
GROUP_BY_LENGTH_CHUNK = 50     # batches per length-sorted mega-chunk
_TOKENIZED_FORMAT_VERSION = 2  # bump when the tokenised columns change, to invalidate caches

PromptData = Dict[str, Dict]


# ---------------------------------------------------------------------------
# Rows of one split: the hub or local files (read by data_files)
# ---------------------------------------------------------------------------

# the hub copies of the named datasets
HUB_NAMES = {"hh": "Anthropic/hh-rlhf", "shp": "stanfordnlp/SHP", "se": "HuggingFaceH4/stack-exchange-preferences"}


@contextlib.contextmanager
def _hub_access(hub_name: str):
    """datasets offline at once when the hub is unreachable (it would retry each file for ~25 s;
    a cached copy still loads), as utils.load_pretrained does for models; every failure becomes
    one ConfigError line naming the dataset_paths key that gives a local copy instead."""
    name = next((short for short, hub in HUB_NAMES.items() if hub == hub_name), hub_name)
    offline = not utils.hub_reachable()
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = was_offline or offline
    fix = (f"pass dataset_paths.{name}=FILE (a local copy: a {SUPPORTED_FORMATS} file, or a folder "
           "laid out like the hub repository)")
    try:
        yield
    except Exception as e:  # many failure types (offline, bad split, auth); all need the same advice
        if offline:
            raise utils.ConfigError(f"datasets=[{name}]: the Hugging Face hub is unreachable (offline) and "
                                    f"no cached copy of {hub_name} exists; {fix}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise utils.ConfigError(f"datasets=[{name}]: could not load {hub_name} from the Hugging Face hub "
                                f"({type(e).__name__}: {first}); {fix}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline


def _load_hub(hub_name: str, split: str, cache_dir: Optional[str]):
    """Load one split from the hub (or its cached copy)."""
    with _hub_access(hub_name):
        return datasets.load_dataset(hub_name, split=split, cache_dir=cache_dir)


def check_hub_datasets(names: Sequence[str], paths: Optional[Dict[str, str]]) -> None:
    """Refuse, before anything is built, a hub dataset without a local path that cannot be had:
    the hub unreachable and no cached copy (utils.ConfigError naming dataset_paths.NAME)."""
    for name in names:
        if name in HUB_NAMES and (paths or {}).get(name) is None and not utils.hub_reachable():
            with _hub_access(HUB_NAMES[name]):
                datasets.load_dataset_builder(HUB_NAMES[name])


def _rows(hub_name: str, split: str, cache_dir, path, silent: bool) -> Iterator[Tuple[str, dict]]:
    """Rows of one split, from the hub (path None) or from local files."""
    if path is None:
        if not silent:
            print(f"Loading {hub_name} ({split} split) from the Hugging Face hub...")
        for number, row in enumerate(_load_hub(hub_name, split, cache_dir), start=1):
            yield f"{hub_name} [{split}], row {number}", row
        return
    for file in resolve_data_files(path, split):
        if not silent:
            print(f"Reading {hub_name} ({split} split) from {file}")
        yield from read_rows(file)


# ---------------------------------------------------------------------------
# Row validation and the prompt table shared by all loaders
# ---------------------------------------------------------------------------

class LoadedData(dict):
    """PromptData (a plain dict, prompt -> entry) that also says what loading dropped.

    Attributes:
        source: where the split was read from (file, directory or hub name), for messages.
        offered: candidate pairs seen (one per chosen/rejected row; one per answer pair in SE).
        dropped: reason -> number of candidate pairs dropped for it.
    """

    def __init__(self, data: PromptData, offered: int = 0, dropped: Optional[Dict[str, int]] = None):
        super().__init__(data)
        self.source = ""
        self.offered = offered
        self.dropped = dict(dropped or {})

    def kept_summary(self, label: str) -> str:
        """One line, e.g. "hh [train]: kept 9,996 of 10,000 pairs (4 with chosen equal to rejected)"."""
        kept = self.offered - sum(self.dropped.values())
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in self.dropped.items() if n)
        return f"{label}: kept {kept:,} of {self.offered:,} pairs" + (f" ({reasons})" if reasons else "")


EQUAL_PAIR = "with chosen equal to rejected"


class _PromptTable:
    """Accumulates responses, pairs and SFT targets per prompt, counting dropped pairs.

    Responses are de-duplicated per prompt (SHP repeats a comment across many rows), and a
    pair whose two sides are the same text is dropped: it carries no preference signal.
    """

    def __init__(self):
        self._data: PromptData = {}
        self._index: Dict[str, Dict[str, int]] = {}
        self._sft_score: Dict[str, float] = {}
        self._offered = 0
        self._dropped: Dict[str, int] = {}

    def _entry(self, prompt: str) -> dict:
        if prompt not in self._data:
            self._data[prompt] = {"responses": [], "pairs": [], "sft_target": None}
            self._index[prompt] = {}
        return self._data[prompt]

    def response(self, prompt: str, text: str) -> int:
        """Index of ``text`` among the prompt's responses, adding it if new."""
        entry, index = self._entry(prompt), self._index[prompt]
        if text not in index:
            index[text] = len(entry["responses"])
            entry["responses"].append(text)
        return index[text]

    def skip(self, reason: str) -> None:
        """Count a candidate pair the loader filtered out (reason reads "4 <reason>")."""
        self._offered += 1
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def add_pair(self, prompt: str, preferred: str, dispreferred: str) -> None:
        i, j = self.response(prompt, preferred), self.response(prompt, dispreferred)
        if i == j:
            self.skip(EQUAL_PAIR)
        else:
            self._offered += 1
            self._data[prompt]["pairs"].append((i, j))

    def add_row(self, prompt: str, chosen: str, rejected: str) -> None:
        """One chosen/rejected row; the first row's chosen response is the SFT target."""
        self.offer_sft(prompt, chosen)
        self.add_pair(prompt, chosen, rejected)

    def add_example(self, prompt: str, completion: str, label: bool) -> None:
        """One unpaired example (TRL's KTO format); the first desirable one is the SFT target."""
        i = self.response(prompt, completion)  # paired data's entries have no 'examples' key
        self._data[prompt].setdefault("examples", []).append((i, bool(label)))
        if label and prompt not in self._sft_score:
            self.offer_sft(prompt, completion)

    def offer_sft(self, prompt: str, text: str, score: float = 0.0) -> None:
        """Make ``text`` the SFT target unless one with an equal or higher score came first."""
        self.response(prompt, text)
        if prompt not in self._sft_score or score > self._sft_score[prompt]:
            self._sft_score[prompt] = score
            self._data[prompt]["sft_target"] = text

    def finish(self) -> LoadedData:
        return LoadedData(self._data, self._offered, self._dropped)


# ---------------------------------------------------------------------------
# Anthropic HH
# ---------------------------------------------------------------------------

_HH_SCHEMA = "HH rows need string columns 'chosen' and 'rejected' (whole transcripts)."


def get_hh(split: str, silent: bool = False, cache_dir: Optional[str] = None, path=None,
           tokenizer=None) -> PromptData:
    """Anthropic Helpful-Harmless (``Anthropic/hh-rlhf``).

    Rows sharing a prompt are merged into one entry with several pairs; the SFT target is
    the chosen response of the first such row.  Rows with chosen == rejected give no pair
    (a pair (i, i) teaches nothing and has zero DPO gradient) but still contribute their
    prompt and chosen reply for SFT.
    """
    table = _PromptTable()
    for where, row in _rows(HUB_NAMES["hh"], split, cache_dir, path, silent):
        chosen = _field(row, "chosen", str, where, _HH_SCHEMA)
        rejected = _field(row, "rejected", str, where, _HH_SCHEMA)
        table.add_row(*split_hh_transcripts(chosen, rejected, where))
    return table.finish()


# ---------------------------------------------------------------------------
# Stanford Human Preferences
# ---------------------------------------------------------------------------

_SHP_SCHEMA = ("SHP rows need 'history', 'human_ref_A', 'human_ref_B' (str), 'score_A', "
               "'score_B' (int) and 'labels' (1 if A is preferred, 0 if B).")


def _score_ratio(score_a: float, score_b: float) -> float:
    """max/min of the two scores; SHP scores are >= 1, a non-positive one counts as unbounded."""
    low, high = sorted((score_a, score_b))
    return high / low if low > 0 else math.inf


def get_shp(split: str, silent: bool = False, cache_dir: Optional[str] = None, path=None,
            tokenizer=None) -> PromptData:
    """Stanford Human Preferences (``stanfordnlp/SHP``; splits train/validation/test).

    Pairs whose score ratio is below 2 are dropped (recomputed from the scores, as the DPO
    code does); a post all of whose pairs are dropped does not appear.  The SFT target is
    the highest-scored response kept for the prompt.
    """
    table = _PromptTable()
    for where, row in _rows(HUB_NAMES["shp"], split, cache_dir, path, silent):
        history = _field(row, "history", str, where, _SHP_SCHEMA)
        ref_a = _field(row, "human_ref_A", str, where, _SHP_SCHEMA)
        ref_b = _field(row, "human_ref_B", str, where, _SHP_SCHEMA)
        score_a = _field(row, "score_A", (int, float), where, _SHP_SCHEMA)
        score_b = _field(row, "score_B", (int, float), where, _SHP_SCHEMA)
        label = _field(row, "labels", int, where, _SHP_SCHEMA)
        if label not in (0, 1):
            raise DatasetFormatError(f"{where}: column 'labels' must be 0 or 1, got {label}. {_SHP_SCHEMA}")
        if _score_ratio(score_a, score_b) < SHP_MIN_SCORE_RATIO:
            table.skip("with a score ratio below 2")
            continue
        prompt = HUMAN_MARKER + " " + history + ASSISTANT_MARKER
        a, b = " " + ref_a, " " + ref_b
        table.add_pair(prompt, *((a, b) if label == 1 else (b, a)))
        table.offer_sft(prompt, a, score_a)
        table.offer_sft(prompt, b, score_b)
    return table.finish()


# ---------------------------------------------------------------------------
# StackExchange
# ---------------------------------------------------------------------------

def se_split_indices(n_rows: int, split: str) -> np.ndarray:
    """Row indices of the derived SE split, in the order the DPO code visits them.

    The hub has only 'train'; the DPO code shuffles it with seed 42 and takes the first 1%
    as 'test'.  ``datasets.Dataset.shuffle(seed=42)`` is the permutation of
    ``np.random.default_rng(42)``, so this reproduces the same split without the hub.  A
    tiny local copy still gets one test row (int(n * 1%) would be zero below 100 rows).
    """
    if split not in ("train", "test"):
        raise ValueError(f"StackExchange has splits 'train' and 'test' (derived), not '{split}'.")
    n_test = max(int(n_rows * SE_TEST_FRACTION), 1 if n_rows > 1 else 0)
    permutation = np.random.default_rng(SE_SPLIT_SEED).permutation(n_rows)
    return permutation[:n_test] if split == "test" else permutation[n_test:]


_SE_SCHEMA = ("StackExchange rows need 'question' (HTML str) and 'answers' (a list of objects with "
              "'text' (HTML str) and 'pm_score' (int)).")


def _se_rows(split: str, cache_dir, path, silent: bool) -> Iterator[Tuple[str, dict]]:
    """SE rows of the derived split (hub 'train' shuffled with seed 42, 1% test)."""
    hub_name = HUB_NAMES["se"]
    if path is not None and "{split}" in str(path):
        yield from _rows(hub_name, split, cache_dir, path, silent)  # the files are already split
        return
    if path is None:
        if not silent:
            print(f"Loading {hub_name} (train split, {split} part) from the Hugging Face hub...")
        dataset = _load_hub(hub_name, "train", cache_dir)
        keep = se_split_indices(len(dataset), split)
        for index, row in zip(keep, dataset.select(keep)):
            yield f"{hub_name} [train], row {int(index) + 1}", row
        return
    # a local copy is read whole; fine for samples, a full 10M-row copy needs a lot of memory
    rows = [item for file in resolve_data_files(path, split, match_split=False) for item in read_rows(file)]
    for index in se_split_indices(len(rows), split):
        yield rows[index]


def _se_answer(answer, where: str, number: int) -> Tuple[str, int]:
    where = f"{where}, answer {number}"
    if not isinstance(answer, dict):
        raise DatasetFormatError(f"{where}: each answer must be an object, got {type(answer).__name__}. {_SE_SCHEMA}")
    text = _field(answer, "text", str, where, _SE_SCHEMA)
    return " " + html_to_text(text), _field(answer, "pm_score", int, where, _SE_SCHEMA)


def get_se(split: str, silent: bool = False, cache_dir: Optional[str] = None, path=None,
           tokenizer=None) -> PromptData:
    """StackExchange preferences (``HuggingFaceH4/stack-exchange-preferences``).

    Every two answers with different pm_score form a pair (higher preferred; ties carry no
    preference and are skipped).  The SFT target is the highest-scored answer (first on
    ties).  HTML is reduced to text with ``html_to_text``.
    """
    table = _PromptTable()
    for where, row in _se_rows(split, cache_dir, path, silent):
        question = _field(row, "question", str, where, _SE_SCHEMA)
        answers = _field(row, "answers", (list, dict), where, _SE_SCHEMA)
        if isinstance(answers, dict):  # a `datasets` Sequence of structs arrives as columns
            answers = [dict(zip(answers, values)) for values in zip(*answers.values())]
        prompt = HUMAN_MARKER + " " + html_to_text(question) + ASSISTANT_MARKER
        scored = [_se_answer(a, where, k) for k, a in enumerate(answers, start=1)]
        for text, score in scored:
            table.offer_sft(prompt, text, score)
        for i, (text_i, score_i) in enumerate(scored):
            for text_j, score_j in scored[i + 1:]:
                if score_i == score_j:
                    table.skip("with tied scores")  # a tie states no preference
                else:
                    table.add_pair(prompt, *((text_i, text_j) if score_i > score_j else (text_j, text_i)))
    return table.finish()


# ---------------------------------------------------------------------------
# Synthetic dataset (embedded default: no downloads; generated by synthetic_data)
# ---------------------------------------------------------------------------

def get_synthetic(split: str, silent: bool = False, cache_dir: Optional[str] = None, path=None,
                  tokenizer=None) -> PromptData:
    """Synthetic preference data generated in code (no downloads, same on every machine).

    Four short tasks whose right answer is a simple function of the prompt (see
    ``synthetic_data``); the rejected answer is a plausible mistake that goes wrong at its
    first token.  One pair per prompt; the SFT target is the right answer.  Train has 6000
    prompts, test 400 prompts that never occur in train.  The generator seed is fixed,
    independent of any training seed.
    """
    if path is not None:
        raise ValueError("the synthetic dataset is generated in code and takes no path; "
                         "remove the path for 'synthetic'.")
    table = _PromptTable()
    for prompt, right, wrong in synthetic_split(split):
        table.add_row(prompt, right, wrong)
    return table.finish()


# ---------------------------------------------------------------------------
# The user's own data: TRL preference format
# ---------------------------------------------------------------------------

def get_preference_file(split: str, silent: bool = False, cache_dir: Optional[str] = None, path=None,
                        tokenizer=None, processor=None) -> PromptData:
    """The user's preference data in TRL's format, from local file(s) at ``path``.

    Formats (per row): standard (``prompt``, ``chosen``, ``rejected`` text; responses are
    used as written, so include any separating space), implicit prompt (``chosen`` and
    ``rejected`` only; the prompt is their common prefix) and conversational (lists of
    ``{role, content}`` messages rendered with ``tokenizer.apply_chat_template``; chosen and
    rejected may also repeat the prompt messages).  Rows sharing a prompt are merged; the
    SFT target is the first row's chosen response.  A file may instead hold TRL's unpaired
    format (``prompt``, ``completion``, boolean ``label``, text or messages) for KTO; it
    cannot mix the two.  Rows with ``images`` (TRL's vision format) are rendered with a
    vision-language model's ``processor`` (vision.image_row_to_text); their prompt key is
    (prompt text, image bytes).  ``{split}`` in ``path`` selects per-split
    files, otherwise every split reads the same file; in a directory, a split reads the files
    whose name contains it as a word (``test.csv``, ``prefs-train.jsonl``).
    """
    if path is None:
        raise ValueError(f"get_preference_file needs path= pointing at a {SUPPORTED_FORMATS} file.")
    table = _PromptTable()
    for file in resolve_data_files(path, split):
        if not silent:
            print(f"Reading preference data ({split} split) from {file}")
        first_kind = None
        for where, row in read_rows(file):
            unpaired = is_unpaired_row(row)
            first_kind = unpaired if first_kind is None else first_kind
            if unpaired != first_kind:
                raise DatasetFormatError(f"{where}: mixes unpaired rows (prompt, completion, label) with "
                                         "paired rows (chosen, rejected) in one file; keep one format per file.")
            if vision.is_image_row(row):
                if unpaired:
                    raise DatasetFormatError(f"{where}: unpaired rows (prompt, completion, label) with images "
                                             "are not supported; use pairs (prompt, chosen, rejected).")
                table.add_row(*vision.image_row_to_text(row, where, processor, file.parent))
            elif unpaired:
                table.add_example(*unpaired_row_to_text(row, where, tokenizer))
            else:
                table.add_row(*preference_row_to_text(row, where, tokenizer))
    return table.finish()


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

DATASETS: Dict[str, Callable[..., PromptData]] = {
    "hh": get_hh,
    "shp": get_shp,
    "se": get_se,
    "synthetic": get_synthetic,
}

# how to shorten an over-long prompt.  HH conversations and the user's own files keep the prompt's
# end: the latest turn, the question and a chat template's assistant header are there (TRL's
# DPOTrainer also keeps the last max_prompt_length tokens).  SHP and SE keep their start, as in
# the DPO repository (a post's title and question come first).
TRUNCATION_MODES = {"hh": "keep_end", "shp": "keep_start", "se": "keep_start", "synthetic": "keep_start"}


def truncation_mode_for(name: str) -> str:
    return TRUNCATION_MODES.get(name, "keep_end")


def _is_data_file_name(name: str, split: str) -> bool:
    return data_suffix(Path(name.replace("{split}", split))) is not None


def get_dataset(name: str, split: str, silent: bool = False, cache_dir: Optional[str] = None,
                path=None, tokenizer=None, processor=None) -> PromptData:
    """Load one split of a dataset as {prompt: {'responses', 'pairs', 'sft_target'}}.

    Args:
        name: a key of ``DATASETS`` or the path of a TRL-format preference file.
        split: split name ('train', 'test', ...).
        silent: suppress progress messages.
        cache_dir: cache directory for hub downloads.
        path: local copy of a named dataset (file or hub-like directory); None = the hub.
            With an unregistered name, the TRL-format file to read.
        tokenizer: needed only to render conversational (chat) rows.
        processor: a vision-language model's, for rows with images (your own files only).
    """
    images = {}
    if name in DATASETS:
        loader = DATASETS[name]
    elif path is not None or _is_data_file_name(name, split):
        loader, path = get_preference_file, (path if path is not None else name)
        images = {"processor": processor}
    elif Path(name.replace("{split}", split)).is_file():
        raise DatasetFormatError(unsupported_format_message(name))
    else:
        raise DatasetFormatError(f"unknown dataset '{name}'; known names: {', '.join(sorted(DATASETS))}. "
                                 f"A path to a local {SUPPORTED_FORMATS} preference file is accepted too.")
    data = loader(split, silent=silent, cache_dir=cache_dir, path=path, tokenizer=tokenizer, **images)
    if not isinstance(data, LoadedData):  # a loader that builds its own dict counts no drops
        data = LoadedData(data, offered=sum(len(entry["pairs"]) for entry in data.values()))
    data.source = str(path).replace("{split}", split) if path is not None else f"'{name}' from the hub"
    if not data:
        raise DatasetFormatError(f"{data.source}: no usable prompts in the {split} split of {name!r}"
                                 f"{_dropped_note(data)}; check the split name and the data files.")
    return data


def _dropped_note(data: LoadedData) -> str:
    """' (all 5 pairs dropped: 5 with chosen equal to rejected)', or '' when nothing was dropped."""
    if not data.dropped:
        return ""
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in data.dropped.items())
    every = data.offered == sum(data.dropped.values())
    return f" (all {data.offered:,} pairs dropped: {reasons})" if every else f" ({reasons})"


# ---------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------

def _check_truncation_mode(truncation_mode: str) -> None:
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"unknown truncation_mode '{truncation_mode}'; use 'keep_start' or 'keep_end'.")


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
                         f"max_length={max_length}; otherwise no room is left for the response.")


def _token_ids(tokenizer, texts: List[str]) -> List[List[int]]:
    """Token ids of each text, without BOS/EOS (the DPO code adds only EOS, itself)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def assemble(prompt: str, chosen: str, rejected: str, prompt_ids: List[int], chosen_ids: List[int],
              rejected_ids: List[int], eos_token_id: int, truncation_mode: str, max_length: int,
              max_prompt_length: int, keep_prompt: bool = False) -> Dict:
    """Truncate and label one tokenised (prompt, chosen, rejected) triple (also online.py's pairs).
    With keep_prompt (a prompt holding image tokens, whose count must match its images) only the
    responses are cut."""
    # a chat template may already end the turn with EOS; a second one would be trained on
    chosen_ids = chosen_ids if chosen_ids[-1:] == [eos_token_id] else chosen_ids + [eos_token_id]
    rejected_ids = rejected_ids if rejected_ids[-1:] == [eos_token_id] else rejected_ids + [eos_token_id]
    longer = max(len(chosen_ids), len(rejected_ids))
    n_prompt, n_responses = len(prompt_ids), len(chosen_ids) + len(rejected_ids)
    if len(prompt_ids) + longer > max_length and not keep_prompt:
        prompt_ids = (prompt_ids[:max_prompt_length] if truncation_mode == "keep_start"
                      else prompt_ids[-max_prompt_length:])
    if len(prompt_ids) + longer > max_length:
        room = max_length - max(len(prompt_ids), max_prompt_length)
        if room < 1:
            raise DatasetFormatError(f"a prompt with images takes {len(prompt_ids)} tokens (its image tokens "
                                     f"included), leaving no room for a response within max_length={max_length}; "
                                     "raise max_length (prompts with images are never cut).")
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    element = {"prompt": prompt, "chosen": prompt + chosen, "rejected": prompt + rejected,
               "chosen_response_only": chosen, "rejected_response_only": rejected,
               # 1 when cut, 0 when whole: counted in the metrics (data/truncated_*) and at start-up
               "prompt_truncated": int(len(prompt_ids) < n_prompt),
               "response_truncated": int(len(chosen_ids) + len(rejected_ids) < n_responses)}
    for side, response_ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        ids = prompt_ids + response_ids
        element[f"{side}_input_ids"] = ids
        element[f"{side}_attention_mask"] = [1] * len(ids)
        element[f"{side}_labels"] = [-100] * len(prompt_ids) + response_ids  # loss on the response only
    element["prompt_input_ids"] = prompt_ids
    element["prompt_attention_mask"] = [1] * len(prompt_ids)
    return element


def tokenize_batch_element(prompt: str, chosen: str, rejected: str, truncation_mode: str, tokenizer,
                           max_length: int, max_prompt_length: int) -> Dict:
    """Tokenise one (prompt, chosen response, rejected response) triple.

    Prompt and responses are tokenised separately without special tokens, and EOS is
    appended to each response.  If prompt + the longer response exceeds ``max_length`` the
    prompt is cut to ``max_prompt_length`` tokens (keeping its end for 'keep_end', its
    start for 'keep_start'); if that is still too long, both responses are cut to
    ``max_length - max_prompt_length`` tokens.

    Returns:
        dict with ``{chosen,rejected}_{input_ids,attention_mask,labels}`` (prompt + response;
        labels are the ids with prompt positions set to -100), ``prompt_input_ids``,
        ``prompt_attention_mask`` (lists of ints), the texts ``prompt``, ``chosen``,
        ``rejected`` (prompt + response), ``chosen_response_only``, ``rejected_response_only``,
        and ``prompt_truncated``, ``response_truncated`` (1 when that part was cut, else 0).
    """
    _check_truncation_mode(truncation_mode)
    _check_lengths(max_length, max_prompt_length)
    prompt_ids, chosen_ids, rejected_ids = _token_ids(tokenizer, [prompt, chosen, rejected])
    return assemble(prompt, chosen, rejected, prompt_ids, chosen_ids, rejected_ids,
                     _eos_id(tokenizer), truncation_mode, max_length, max_prompt_length)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token (responses end with it).")
    return tokenizer.eos_token_id


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one, e.g. tokenizer.pad_token = "
                         "tokenizer.eos_token (padding is masked out of the loss either way).")
    return tokenizer.pad_token_id


def _tokenize_columns(batch: Dict[str, list], tokenizer, truncation_mode: str, max_length: int,
                      max_prompt_length: int, processor=None) -> Dict[str, list]:
    """``datasets.map`` function (batched): tokenise the flattened pairs column-wise; a prompt
    with images through the processor, which expands its image tokens (the image files are kept
    in an ``images`` column: collate makes their tensors, as TRL's collator does, so that the
    cache holds no pixel tensors)."""
    texts = [batch["prompt"], batch["chosen_response"], batch["rejected_response"]]
    ids = [_token_ids(tokenizer, column) for column in texts]
    images = batch.get("images") or [[]] * len(texts[0])
    for i, pictures in enumerate(images):
        if pictures:
            ids[0][i] = vision.encode_prompt(processor, texts[0][i], pictures)[0]
    eos = _eos_id(tokenizer)
    out: Dict[str, list] = {}
    for row, pictures in zip(zip(*texts, *ids), images):
        element = assemble(*row, eos, truncation_mode, max_length, max_prompt_length,
                           keep_prompt=bool(pictures))
        if "images" in batch:
            element["images"] = pictures
        element["length"] = len(element["chosen_input_ids"]) + len(element["rejected_input_ids"])
        for key, value in element.items():
            out.setdefault(key, []).append(value)
    if "label" in batch:  # unpaired examples (KTO): the label travels with its example
        out["label"] = list(batch["label"])
    return out


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Temporarily silence datasets' progress bars, restoring the caller's setting after."""
    was_disabled = datasets.are_progress_bars_disabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _default_cache_dir() -> str:
    # read the variable now: `datasets` froze its copy at import, before callers could set it
    root = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
    return str(Path(root) / "preference_tokenized")


def tokenize_dataset(columns: Dict[str, List[str]], tokenizer, truncation_mode: str, max_length: int,
                     max_prompt_length: int, cache_dir: Optional[str] = None,
                     silent: bool = False, processor=None) -> datasets.Dataset:
    """Tokenise flattened (prompt, chosen_response, rejected_response) columns, once.

    The result is written to an Arrow file under ``cache_dir/tokenized/`` named by a hash of
    the texts, the tokenizer and the length settings, so later runs memory-map it instead
    of tokenising again.  A file lock keeps concurrent ranks from writing it twice.  A
    checksum written after the Arrow file marks it complete; a cache file without a matching
    one (a run killed mid-write, a full disk, a damaged file) is rebuilt with one warning.
    """
    settings = (f"v{_TOKENIZED_FORMAT_VERSION}|{truncation_mode}|{max_length}|{max_prompt_length}|"
                f"{vision.processor_fingerprint(processor) if 'images' in columns else ''}")
    key = data_files.cache_key(settings, tokenizer, {name: [str(v) for v in values] if name == "label"
                                                     else vision.images_keys(values) if name == "images"
                                                     else values for name, values in columns.items()})
    directory = Path(cache_dir or _default_cache_dir()) / "tokenized"
    directory.mkdir(parents=True, exist_ok=True)
    cache_file = directory / f"{key}.arrow"
    with FileLock(str(cache_file) + ".lock"), _progress_bars(not silent):
        cached = data_files.open_verified_cache(cache_file)
        if cached is not None:
            return cached
        flat = datasets.Dataset.from_dict(columns)
        tokenized = flat.map(_tokenize_columns, batched=True, batch_size=1000,
                             remove_columns=flat.column_names, cache_file_name=str(cache_file),
                             fn_kwargs=dict(tokenizer=tokenizer, truncation_mode=truncation_mode,
                                            max_length=max_length, max_prompt_length=max_prompt_length,
                                            processor=processor),
                             new_fingerprint=key, desc="Tokenising")
        data_files.write_cache_checksum(cache_file)
        return tokenized


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------

def _pad_value(key: str, pad_token_id: int) -> int:
    if key.endswith("_input_ids"):
        return pad_token_id
    if key.endswith("_labels"):
        return -100  # ignored by the log-prob gather
    return 0  # attention masks


def _right_padded(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """(B, longest) LongTensor of the token lists, right-padded with `value`: one numpy array
    filled row by row (a tensor per row and pad_sequence cost five times as much)."""
    out = np.full((len(rows), max(map(len, rows), default=0)), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return torch.from_numpy(out)


def collate(elements: Sequence[Dict], pad_token_id: int, processor=None) -> Dict:
    """Stack elements into a batch: token lists become right-padded LongTensors.

    Each key is padded to its own longest sequence, so chosen and rejected (run as two
    forward passes) are not padded to the longer of the two.  Text fields stay lists.  Image
    files (``images``) become ``image_inputs``, each example's {name: tensor} ({} for none),
    made by the VLM's `processor` from the prompt and its images as at tokenisation.
    """
    batch = {}
    for key in elements[0]:
        values = [element[key] for element in elements]
        if key.endswith(("_input_ids", "_attention_mask", "_labels")):
            batch[key] = _right_padded(values, _pad_value(key, pad_token_id))
        elif key == "label":  # unpaired examples: True for desirable
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif key == "images":
            batch["image_inputs"] = [vision.encode_prompt(processor, element["prompt"], images)[1]
                                     for element, images in zip(elements, values)]
        else:
            batch[key] = values
    return batch


def get_collate_fn(tokenizer) -> Callable[[Sequence[Dict]], Dict]:
    """``collate`` bound to the tokenizer's pad id (raises if the tokenizer has none)."""
    pad_token_id = _pad_id(tokenizer)
    return lambda elements: collate(elements, pad_token_id)


def _flatten(data: PromptData, sft_mode: bool) -> Tuple[Dict[str, List[str]], List[int]]:
    """One row per training element, and how many consecutive rows each prompt owns.

    DPO mode: one row per pair.  SFT mode: one row per prompt whose chosen and rejected are
    both the SFT target (the keys stay present; only chosen_* is meaningful).
    """
    columns = {"prompt": [], "chosen_response": [], "rejected_response": []}
    group_sizes = []
    for prompt, entry in data.items():
        responses = entry["responses"]
        if sft_mode:  # a prompt of unpaired data with undesirable examples only has no target
            pairs = [(entry["sft_target"],) * 2] if entry["sft_target"] is not None else []
        else:
            pairs = [(responses[i], responses[j]) for i, j in entry["pairs"]]
        _add_group(columns, group_sizes, prompt, pairs)
    return _image_column(columns), group_sizes


def _add_group(columns: Dict[str, list], group_sizes: List[int], prompt: str, rows: List[tuple]):
    """Append one prompt's rows, (chosen, rejected[, label]) each, in the order of `columns`'
    keys after "prompt", and record how many rows the prompt owns."""
    names = list(columns)[1:]
    for row in rows:
        columns["prompt"].append(prompt)
        for name, value in zip(names, row):
            columns[name].append(value)
    if rows:
        group_sizes.append(len(rows))


def _image_column(columns: Dict[str, list]) -> Dict[str, list]:
    """Prompts with images ((text, image bytes) keys, vision.image_row_to_text) as their text in
    'prompt' and their images in an 'images' column ([] for text prompts); text data unchanged."""
    if any(isinstance(p, tuple) for p in columns["prompt"]):
        columns["images"] = [list(p[1]) if isinstance(p, tuple) else [] for p in columns["prompt"]]
        columns["prompt"] = [p[0] if isinstance(p, tuple) else p for p in columns["prompt"]]
    return columns


def _flatten_unpaired(data: PromptData) -> Tuple[Dict[str, list], List[int]]:
    """One row per unpaired example (KTO): a file's labelled examples as they are, and every pair
    unpaired into a desirable (chosen) and an undesirable (rejected) example, as TRL's
    `unpair_preference_dataset`. The rejected columns hold the example's own completion until
    `mismatched_pairs` puts another example's there (the KL estimate's sequence)."""
    columns = {"prompt": [], "chosen_response": [], "rejected_response": [], "label": []}
    group_sizes = []
    for prompt, entry in data.items():
        responses = entry["responses"]
        examples = [(responses[i], label) for i, label in entry.get("examples", ())]
        for i, j in entry["pairs"]:
            examples += [(responses[i], True), (responses[j], False)]
        _add_group(columns, group_sizes, prompt,
                   [(completion, completion, label) for completion, label in examples])
    return _image_column(columns), group_sizes


def _refuse_unpaired(data: PromptData, name: str, split: str) -> None:
    """A paired loss cannot read unpaired examples: refuse rather than drop them."""
    n = sum(len(entry.get("examples", ())) for entry in data.values())
    if n:
        raise UnpairedDataError(f"{data.source}: the {split} split of {name!r} holds {n:,} unpaired examples "
                                "(prompt, completion, label) and this loss trains on chosen/rejected pairs; "
                                "use loss=kto for unpaired data, or a file of pairs.")


def _labelled_epoch_batches(epoch: int, labels: np.ndarray, batch_size: int, shuffle: bool,
                            seed: int, lengths: Optional[np.ndarray] = None) -> np.ndarray:
    """Element indices of every batch of one epoch of unpaired examples, (n_batches, batch_size).

    Every batch holds both labels (KTO's KL estimate and its two weights assume it), in the
    data's proportion: k = round(batch_size * desirable fraction), at least 1 and at most
    batch_size - 1 desirable examples per batch. Desirable and undesirable examples are shuffled
    separately (seeded by (seed, epoch), as `_epoch_batches`), then mixed within each batch; the
    examples of the larger side left over once the other is used up wait for the next epoch.
    With `lengths` (group_by_length) each side is sorted by length within chunks of
    GROUP_BY_LENGTH_CHUNK batches before the batches are formed, and the batch order shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    desirable, undesirable = np.flatnonzero(labels), np.flatnonzero(~labels)
    if shuffle:
        desirable, undesirable = rng.permutation(desirable), rng.permutation(undesirable)
    k = int(min(max(round(batch_size * len(desirable) / len(labels)), 1), batch_size - 1))
    n = min(len(desirable) // k, len(undesirable) // (batch_size - k))
    sides = [desirable[:n * k], undesirable[:n * (batch_size - k)]]
    if lengths is not None:
        sides = [_sorted_in_chunks(side, lengths, GROUP_BY_LENGTH_CHUNK * per) for side, per in
                 zip(sides, (k, batch_size - k))]
    batches = np.concatenate([sides[0].reshape(n, k), sides[1].reshape(n, batch_size - k)], axis=1)
    if shuffle and lengths is not None:
        batches = batches[rng.permutation(n)]
    return rng.permuted(batches, axis=1) if shuffle else batches


def _sorted_in_chunks(elements: np.ndarray, lengths: np.ndarray, chunk: int) -> np.ndarray:
    """`elements` sorted by decreasing length within consecutive chunks of `chunk`."""
    return np.concatenate([part[np.argsort(-lengths[part], kind="stable")]
                           for part in np.array_split(elements, range(chunk, len(elements), chunk))])


def _epoch_batches(epoch: int, group_sizes: np.ndarray, lengths: np.ndarray, batch_size: int,
                   shuffle: bool, seed: int, group_by_length: bool) -> np.ndarray:
    """Element indices of every full batch of one epoch, shape (n_batches, batch_size).

    Prompts are shuffled as units (a prompt's pairs stay adjacent, as in the DPO code), with
    a generator seeded by (seed, epoch): any epoch can be rebuilt without replaying earlier
    ones, which makes resuming exact.  The trailing partial batch is dropped, as in the DPO
    code, so every batch has the same size.
    """
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
    order = rng.permutation(len(group_sizes)) if shuffle else np.arange(len(group_sizes))
    sizes = group_sizes[order]
    # element indices of the groups in `order`: each group's start plus 0..size-1
    offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    elements = np.repeat(starts[order], sizes) + offsets
    if group_by_length:
        elements = _sorted_in_chunks(elements, lengths, GROUP_BY_LENGTH_CHUNK * batch_size)
    n_batches = len(elements) // batch_size
    batches = elements[:n_batches * batch_size].reshape(n_batches, batch_size)
    if group_by_length and shuffle:  # similar lengths within a batch, batches in random order
        batches = batches[rng.permutation(n_batches)]
    return batches


def _batch_schedule(group_sizes: np.ndarray, lengths: np.ndarray, batch_size: int, shuffle: bool,
                    seed: int, group_by_length: bool, n_epochs: Optional[int],
                    n_examples: Optional[int], labels: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """Element indices of each batch, across epochs, until n_epochs or n_examples is reached.

    With n_examples the DPO code stops after the batch that reaches it, i.e. after
    ceil(n_examples / batch_size) batches. With labels (unpaired examples) every batch holds
    both (`_labelled_epoch_batches`).
    """
    max_batches = math.ceil(n_examples / batch_size) if n_examples is not None else None
    produced, epoch = 0, 0
    while n_epochs is None or epoch < n_epochs:
        if labels is not None:
            batches = _labelled_epoch_batches(epoch, labels, batch_size, shuffle, seed,
                                              lengths if group_by_length else None)
        else:
            batches = _epoch_batches(epoch, group_sizes, lengths, batch_size, shuffle, seed, group_by_length)
        for batch in batches:
            if max_batches is not None and produced >= max_batches:
                return
            produced += 1
            yield batch
        epoch += 1


def _check_iterator_args(batch_size, n_epochs, n_examples, seed, skip_batches) -> None:
    if (n_epochs is None) == (n_examples is None):
        raise ValueError(f"set exactly one of n_epochs and n_examples (got n_epochs={n_epochs}, "
                         f"n_examples={n_examples}).")
    for label, value in (("batch_size", batch_size), ("n_epochs", n_epochs), ("n_examples", n_examples)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}.")
    for label, value in (("seed", seed), ("skip_batches", skip_batches)):
        if not isinstance(value, (int, np.integer)) or value < 0:  # numpy seeds must be >= 0
            raise ValueError(f"{label} must be a non-negative integer, got {value!r}.")


def _load_tokenized(names, tokenizer, split, sft_mode, max_length, max_prompt_length, silent,
                    cache_dir, paths, unpaired: bool = False,
                    processor=None) -> Tuple[datasets.Dataset, np.ndarray]:
    """Tokenised elements of all named datasets, and the element count of each prompt; with
    `unpaired`, one element per unpaired example (`_flatten_unpaired`) with a 'label' column."""
    parts, group_sizes = [], []
    for name in names:
        data = get_dataset(name, split, silent=silent, cache_dir=cache_dir,
                           path=(paths or {}).get(name), tokenizer=tokenizer, processor=processor)
        if not (unpaired or sft_mode):
            _refuse_unpaired(data, name, split)
        columns, sizes = _flatten_unpaired(data) if unpaired else _flatten(data, sft_mode)
        if not sizes:
            raise DatasetFormatError(f"{data.source}: no preference pairs to train on in the {split} split "
                                     f"of {name!r}{_dropped_note(data)}.")
        if not silent and not sft_mode and data.offered:
            print(data.kept_summary(f"{name} [{split}]"))
        parts.append(tokenize_dataset(columns, tokenizer, truncation_mode_for(name), max_length,
                                      max_prompt_length, cache_dir=cache_dir, silent=silent,
                                      processor=processor))
        if not silent:
            note = truncation_note(parts[-1], truncation_mode_for(name), max_length, max_prompt_length)
            if note:
                print(f"{name} [{split}]: {note}")
        group_sizes.extend(sizes)
    tokenized = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return tokenized, np.asarray(group_sizes, dtype=np.int64)


def truncation_note(tokenized: datasets.Dataset, truncation_mode: str, max_length: int,
                    max_prompt_length: int) -> str:
    """'3 of 400 prompts cut to their last 128 tokens; ...', or '' when nothing was cut."""
    counts = [int(np.asarray(tokenized.data.column(f"{part}_truncated")).sum())
              for part in ("prompt", "response")]
    kept = "last" if truncation_mode == "keep_end" else "first"
    notes = [f"{counts[0]:,} of {len(tokenized):,} prompts cut to their {kept} {max_prompt_length} tokens "
             f"(max_prompt_length)" if counts[0] else "",
             f"{counts[1]:,} of {len(tokenized):,} examples with responses cut to "
             f"{max_length - max_prompt_length} tokens (max_length - max_prompt_length)" if counts[1] else ""]
    return "; ".join(n for n in notes if n)


def get_batch_iterator(names: List[str], tokenizer, split: str = "train", batch_size: int = 1,
                       shuffle: bool = True, max_length: int = 512, max_prompt_length: int = 128,
                       sft_mode: bool = False, n_epochs: Optional[int] = None,
                       n_examples: Optional[int] = None, seed: int = 0, silent: bool = False,
                       cache_dir: Optional[str] = None, paths: Optional[Dict[str, str]] = None,
                       group_by_length: bool = False, skip_batches: int = 0,
                       unpaired_weights: Optional[Tuple[float, float]] = None,
                       processor=None) -> Iterator[Dict]:
    """Iterator over padded batches of the named datasets.

    Data is loaded and tokenised (or read from the tokenisation cache) when this is called,
    so configuration errors surface immediately; batches are produced lazily.

    Args:
        names: dataset names (keys of ``DATASETS``) or paths of TRL-format preference files.
        tokenizer: Hugging Face tokenizer with EOS and pad tokens.
        split: split to read.
        batch_size: elements per batch; a trailing partial batch of each epoch is dropped.
        shuffle: shuffle prompts each epoch (seeded by ``seed`` and the epoch number).
        max_length: max tokens of prompt + response.
        max_prompt_length: prompt length after truncation of over-long elements.
        sft_mode: one element per prompt with the SFT target (in chosen_* and rejected_*).
        n_epochs: stop after this many epochs. Exactly one of n_epochs/n_examples is set.
        n_examples: stop after the batch reaching this many elements.
        seed: seed of the data order; same seed, same order.
        silent: no progress messages.
        cache_dir: hub download cache and tokenisation cache directory.
        paths: dataset name -> local file/directory (missing or None: the hub).
        group_by_length: batch elements of similar length (sorted within seeded chunks of
            ~50 batches, batch order then shuffled).
        skip_batches: skip the first k batches (cheaply, without collating), for exact resume.
        unpaired_weights: None for pairs; for KTO, its (desirable_weight, undesirable_weight): the
            data becomes unpaired examples (pairs are unpaired), every batch holds both labels,
            the rejected side of each row is its KL sequence (`mismatched_pairs`) and batches
            carry a bool 'label' tensor; the label counts and TRL's weights advice are printed.
        processor: a VLM's, for files with images; batches then carry ``image_inputs`` (vision.py).

    Yields:
        dict of right-padded LongTensors ``{chosen,rejected}_{input_ids,attention_mask,labels}``
        of shape (batch, own max length), ``prompt_{input_ids,attention_mask}``, and lists of
        strings ``prompt``, ``chosen``, ``rejected``, ``chosen_response_only``,
        ``rejected_response_only``.
    """
    _check_iterator_args(batch_size, n_epochs, n_examples, seed, skip_batches)
    _check_lengths(max_length, max_prompt_length)
    pad_token_id = _pad_id(tokenizer)
    _eos_id(tokenizer)  # fail now rather than half-way through tokenising
    unpaired = unpaired_weights is not None
    tokenized, group_sizes = _load_tokenized(names, tokenizer, split, sft_mode, max_length,
                                             max_prompt_length, silent, cache_dir, paths, unpaired,
                                             processor)
    if len(tokenized) < batch_size:
        raise DatasetFormatError(_too_small_message(names, split, len(tokenized), batch_size))
    lengths = np.asarray(tokenized.data.column("length"))
    labels = _checked_labels(tokenized, names, split, batch_size, unpaired_weights, silent) if unpaired else None
    schedule = _batch_schedule(group_sizes, lengths, batch_size, shuffle, seed, group_by_length,
                               n_epochs, n_examples, labels)
    columns = [c for c in tokenized.column_names if c != "length"]
    return _collated(tokenized.select_columns(columns), schedule, skip_batches, pad_token_id,
                     max_length if unpaired else None, processor)


def _checked_labels(tokenized: datasets.Dataset, names: List[str], split: str, batch_size: int,
                    weights: Tuple[float, float], silent: bool) -> np.ndarray:
    """The examples' labels, refused when one value only; prints the counts and TRL's advice."""
    labels = np.asarray(tokenized.data.column("label").to_numpy(zero_copy_only=False), dtype=bool)
    n_good, n_bad, where = int(labels.sum()), int((~labels).sum()), f'{", ".join(map(str, names))} [{split}]'
    if n_good == 0 or n_bad == 0:
        have, lack = ("desirable (label true)", "undesirable") if n_bad == 0 else ("undesirable (label false)",
                                                                                   "desirable")
        raise DatasetFormatError(f"{where}: all {len(labels):,} examples are {have}; KTO needs both desirable and "
                                 f"undesirable examples (its KL estimate and weights compare them): add {lack} "
                                 "ones, or train on desirable-only data with loss=sft.")
    if batch_size < 2:
        raise ValueError(f"batch size {batch_size}: KTO needs at least 2 examples per batch (one of each label, "
                         "and another example's completion for the KL estimate); raise it.")
    per_batch = _labelled_epoch_batches(0, labels, batch_size, False, 0)
    if len(per_batch) == 0:
        raise DatasetFormatError(_too_small_message(names, split, len(labels), batch_size))
    if not silent:
        print(f"{where}: {n_good:,} desirable and {n_bad:,} undesirable examples (ratio {n_good / n_bad:.3g}); "
              f"each batch of {batch_size} holds {int(labels[per_batch[0]].sum())} desirable")
        advice = kto_weight_advice(n_good, n_bad, *weights)
        if advice:
            print(f"warning: {advice}")
    return labels


def mismatched_pairs(elements: List[Dict], max_length: int) -> List[Dict]:
    """KTO's KL sequences in the rejected columns: row i's prompt followed by row i-1's completion
    (the first row takes the last row's: `kto_cpo_orpo.mismatched_order`, TRL's rotation), cut to
    max_length. The rotation spans the whole batch, every process's rows, so that a run on several
    processes scores the same pairs as one (TRL rotates within each device's batch)."""
    out = []
    for element, j in zip(elements, mismatched_order(len(elements)).tolist()):
        other, prompt_ids = elements[j], element["prompt_input_ids"]
        completion = other["chosen_input_ids"][len(other["prompt_input_ids"]):][:max_length - len(prompt_ids)]
        ids = prompt_ids + completion
        out.append(dict(element, rejected_input_ids=ids, rejected_attention_mask=[1] * len(ids),
                        rejected_labels=[-100] * len(prompt_ids) + completion,
                        rejected=element["prompt"] + other["chosen_response_only"],
                        rejected_response_only=other["chosen_response_only"]))
    return out


def _too_small_message(names: List[str], split: str, n_elements: int, batch_size: int) -> str:
    """One line for a split that cannot fill one batch, naming the setting to lower.

    Training reads the 'train' split with ``batch_size``; evaluation reads every other split
    with ``eval_batch_size`` (see trainers.BasicTrainer.build_eval_batches).
    """
    setting = ("batch_size" if split == "train"
               else "eval_batch_size (n_eval_examples then counts whole batches of it)")
    return (f'the {split} split of {", ".join(map(str, names))} has {n_elements:,} examples, fewer than '
            f'one batch of {batch_size:,}, so no full batch can be formed; set {setting} to at most '
            f'{n_elements:,}, or add data.')


def _collated(tokenized: datasets.Dataset, schedule: Iterator[np.ndarray], skip_batches: int,
              pad_token_id: int, mismatch_length: Optional[int] = None, processor=None) -> Iterator[Dict]:
    # the schedule holds only index arrays, so skipping costs no row reads or padding
    for indices in itertools.islice(schedule, skip_batches, None):
        rows = tokenized[indices.tolist()]
        keys = list(rows)
        elements = [dict(zip(keys, values)) for values in zip(*rows.values())]
        if mismatch_length is not None:
            elements = mismatched_pairs(elements, mismatch_length)
        yield collate(elements, pad_token_id, processor)
