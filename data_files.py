"""How preference rows come off disk: local data files, their formats and where they are found.

``read_rows(path)`` yields ``(where, row)`` for every row of one file, where ``where`` is a
human-readable location ("file, line 3" for line-based text, "file, row 3" for JSON arrays and
parquet) used in error messages; ``resolve_data_files(path, split)`` finds the files holding a
split.  Supported formats: JSON Lines, JSON (an array, or JSON Lines named .json as on the hub),
parquet and CSV (a header row naming the columns), each optionally gzipped (``.gz``).

Also here: turning one row into (prompt, chosen response, rejected response) text (TRL's
preference format, HH transcripts, StackExchange HTML), and the tokenised-data cache files
(their names, and a checksum that marks a complete one).

Malformed files and rows raise ``DatasetFormatError``: one line naming the file, the 1-based line
or row and the problem, which ``train.py`` prints as ``error: ...`` (exit status 2).
"""
import csv
import gzip
import hashlib
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SUPPORTED_FORMATS = ".jsonl, .json, .parquet or .csv (each optionally .gz)"
_UTF8_BOM = b"\xef\xbb\xbf"  # Excel and Notepad start "UTF-8" files with it


class DatasetFormatError(ValueError):
    """A data file or row does not have the expected schema (message names file and line/row)."""


class UnpairedDataError(DatasetFormatError):
    """Unpaired examples (prompt, completion, label) where chosen/rejected pairs are needed."""


def data_suffix(path) -> Optional[str]:
    """'.jsonl', '.json', '.parquet' or '.csv' for a (possibly gzipped) data file, else None."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return next((s for s in DATA_SUFFIXES if name.endswith(s)), None)


def unsupported_format_message(path) -> str:
    """The one-line refusal of a file whose extension names no supported format."""
    return f"{path}: unsupported data file type; use {SUPPORTED_FORMATS}."


# ---------------------------------------------------------------------------
# Bytes and text
# ---------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    """Whole file contents, decompressed when the name ends in .gz."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; truncated gzip is EOFError
        raise DatasetFormatError(f"{path}: cannot read the file ({e}). "
                                 "Check that it is complete and, if named .gz, really gzipped.") from None


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{where}: not UTF-8 text ({e}). Re-save the file as UTF-8.") from None


def _strip_bom(data: bytes) -> bytes:
    return data[len(_UTF8_BOM):] if data.startswith(_UTF8_BOM) else data


# ---------------------------------------------------------------------------
# One reader per format; each yields (where, row)
# ---------------------------------------------------------------------------

def _iter_jsonl(path: Path, data: bytes) -> Iterator[Tuple[str, object]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}, line {number}"
        line = _decode(raw, where).strip()
        if not line:  # blank lines (e.g. after the final newline) carry no row
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{where}: not valid JSON ({e.msg}: column {e.colno}). "
                                     "Each line must hold one JSON object.") from None


def _iter_json_array(path: Path, text: str) -> Iterator[Tuple[str, object]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}).") from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}, row {number}", row


def _iter_parquet(path: Path, data: bytes) -> Iterator[Tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise DatasetFormatError(f"{path}: not a readable parquet file ({e}).") from None
    number = 0
    for record_batch in parquet.iter_batches():
        for row in record_batch.to_pylist():
            number += 1
            yield f"{path}, row {number}", row


def _csv_header(path: Path, reader) -> List[str]:
    header = next((record for record in reader if record), None)
    if header is None:
        return []
    names = [name.strip() for name in header]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates or "" in names:
        problem = f"repeats column {duplicates[0]!r}" if duplicates else "has an unnamed column"
        raise DatasetFormatError(f"{path}, line {reader.line_num}: the header row {problem}; "
                                 "the first row must name each column once (e.g. prompt,chosen,rejected).")
    return names


def _iter_csv(path: Path, data: bytes) -> Iterator[Tuple[str, object]]:
    """CSV rows as {column: text}; a quoted field may span lines (where names its first line)."""
    text = _decode(data, str(path))
    # newline='' hands quoted line breaks to the csv module intact; strict turns bad quoting into errors
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = _csv_header(path, reader)
        first_line = reader.line_num + 1
        for record in reader:
            where = f"{path}, line {first_line}"
            first_line = reader.line_num + 1
            if not record:  # blank line
                continue
            if len(record) != len(header):
                raise DatasetFormatError(f'{where}: has {len(record)} fields but the header names '
                                         f'{len(header)} ({",".join(header)}); quote fields that contain '
                                         'commas or line breaks.')
            yield where, dict(zip(header, record))
    except csv.Error as e:
        raise DatasetFormatError(f"{path}, line {reader.line_num}: not valid CSV ({e}).") from None


def read_rows(path) -> Iterator[Tuple[str, dict]]:
    """Yield ``(where, row)`` for every row of one local data file.

    Args:
        path: a .jsonl/.json/.parquet/.csv file, optionally gzipped. ``.json`` files may be a
            JSON array or, like SHP's hub files, JSON Lines. A leading UTF-8 BOM is ignored.

    Returns:
        iterator of (location for messages, row as a dict of column -> value).
    """
    path = Path(path)
    suffix = data_suffix(path)
    if suffix is None:
        raise DatasetFormatError(unsupported_format_message(path))
    data = _read_bytes(path)
    if suffix == ".parquet":
        rows = _iter_parquet(path, data)
    elif suffix == ".csv":
        rows = _iter_csv(path, _strip_bom(data))
    elif suffix == ".json" and _strip_bom(data).lstrip()[:1] == b"[":
        rows = _iter_json_array(path, _decode(_strip_bom(data), str(path)))
    else:
        rows = _iter_jsonl(path, _strip_bom(data))
    empty = True
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object (one row), got {type(row).__name__}.")
        empty = False
        yield where, row
    if empty:
        header = " (a CSV file needs a header row and then one row per pair)" if suffix == ".csv" else ""
        raise DatasetFormatError(f"{path}: the data file holds no rows{header}; add preference rows "
                                 "or remove it from the dataset.")


# ---------------------------------------------------------------------------
# Finding the files of a split
# ---------------------------------------------------------------------------

def _split_words(path: Path) -> List[str]:
    """Words of a file name without its extensions: 'helpful-base-test.jsonl' -> [helpful, base, test]."""
    stem = path.name.lower().split(".")[0]
    return [w for w in re.split(r"[^a-z0-9]+", stem) if w]


def _data_files_under(directory: Path) -> List[Path]:
    """Supported data files below a directory, skipping hidden files and folders (.git, .cache)."""
    return sorted(f for f in directory.rglob("*")
                  if f.is_file() and data_suffix(f) is not None
                  and not any(part.startswith(".") for part in f.relative_to(directory).parts))


def resolve_data_files(path, split: str, match_split: bool = True) -> List[Path]:
    """The local data files holding ``split``.

    Args:
        path: a data file, or a directory laid out like the hub repository. ``{split}``
            in the path is replaced by the split name.
        split: split name, e.g. 'train'.
        match_split: in a directory, keep only files whose name contains the split as a
            word. (StackExchange has a single split and derives its own test set.)

    Returns:
        the files, sorted by path; raises DatasetFormatError when there are none.
    """
    resolved = Path(str(path).replace("{split}", split)).expanduser()
    if resolved.is_file():
        if data_suffix(resolved) is None:
            raise DatasetFormatError(unsupported_format_message(resolved))
        return [resolved]
    if not resolved.is_dir():
        raise DatasetFormatError(f"data path {resolved} does not exist; pass an existing file or directory.")
    candidates = _data_files_under(resolved)
    if not candidates:
        raise DatasetFormatError(f"{resolved}: the dataset directory holds no data files; "
                                 f"put {SUPPORTED_FORMATS} files in it.")
    files = [f for f in candidates if not match_split or split in _split_words(f)]
    if not files:
        raise DatasetFormatError(
            f"{resolved}: no data files whose name contains '{split}' (as a word, e.g. {split}.jsonl or "
            f"helpful-base-{split}.jsonl.gz) for the {split} split; rename the files, or point at one "
            f"file per split with '{{split}}' in the path (it is replaced by the split name, e.g. "
            f"{resolved / '{split}.jsonl'}).")
    return files


# ---------------------------------------------------------------------------
# The tokenised-data cache: named by a hash; a checksum written last marks a complete file
# ---------------------------------------------------------------------------

def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_path(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".sha256")


def cache_file_problem(cache_file: Path) -> Optional[str]:
    """Why ``cache_file`` cannot be trusted ('missing', 'no checksum', ...), or None if it is intact.

    A run killed while writing the cache, a full disk or a damaged file leaves the file without a
    matching checksum, because ``write_cache_checksum`` runs only after the file is complete.
    """
    if not cache_file.exists():
        return "missing"
    checksum = _checksum_path(cache_file)
    if not checksum.exists():
        return "its checksum file is missing, so it may be incomplete"
    expected = checksum.read_text().strip()
    if _file_sha256(cache_file) != expected:
        return "its contents do not match the checksum written with it (truncated or corrupt)"
    return None


def write_cache_checksum(cache_file: Path) -> None:
    """Record the checksum of a complete cache file (written to a temporary name, then renamed)."""
    checksum = _checksum_path(cache_file)
    partial = checksum.with_name(checksum.name + ".partial")
    partial.write_text(_file_sha256(cache_file) + "\n")
    os.replace(partial, checksum)


def remove_cache_file(cache_file: Path) -> None:
    """Delete a cache file and its checksum (either may be absent)."""
    for path in (_checksum_path(cache_file), cache_file):
        path.unlink(missing_ok=True)


def _tokenizer_fingerprint(tokenizer) -> str:
    """Stable description of a tokenizer for cache keys (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        description = backend.to_str()
    else:
        from datasets.fingerprint import Hasher
        description = Hasher.hash(tokenizer)
    extra = f'{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{getattr(tokenizer, "padding_side", "")}'
    return hashlib.sha256((description + extra).encode("utf-8")).hexdigest()


def cache_key(settings: str, tokenizer, columns: Dict[str, List[str]]) -> str:
    """Name of a tokenised-data cache file: a hash of the settings, the tokenizer and every text."""
    digest = hashlib.sha256()
    digest.update(settings.encode())
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    for name in sorted(columns):
        for text in columns[name]:
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))  # length prefix: no ambiguous joins
            digest.update(encoded)
    return digest.hexdigest()[:32]


def open_verified_cache(cache_file: Path):
    """The cached ``datasets.Dataset`` memory-mapped from ``cache_file``, or None if it must be built.

    A damaged file (see ``cache_file_problem``) is removed, with one warning line naming it.
    """
    import datasets  # heavy; only the tokenisation path needs it
    problem = cache_file_problem(cache_file)
    if problem is None:
        try:
            return datasets.Dataset.from_file(str(cache_file))
        except Exception as e:  # pyarrow raises several types for unreadable files
            problem = f'it cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
    if problem != "missing":
        print(f"warning: rebuilding the tokenised-data cache {cache_file}: {problem}", flush=True)
        remove_cache_file(cache_file)
    return None


# ---------------------------------------------------------------------------
# From a row to (prompt, chosen response, rejected response) text
# ---------------------------------------------------------------------------

def _field(row: dict, key: str, kind, where: str, what: str):
    """row[key], checked to be of type ``kind``; ``what`` names the expected schema."""
    if key not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DatasetFormatError(f"{where}: missing column '{key}' (columns present: {present}). {what}")
    value = row[key]
    # bool is an int subclass; a True score is almost certainly a schema mix-up
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetFormatError(f"{where}: column '{key}' must be {expected}, "
                                 f"got {type(value).__name__}. {what}")
    return value


def _common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search: slice compares run in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def split_hh_transcripts(chosen: str, rejected: str, where: str = "row") -> Tuple[str, str, str]:
    """Split an HH pair into (prompt, chosen_response, rejected_response).

    The prompt is the longest common prefix of the two transcripts, cut back to the end of
    the last complete '\\n\\nAssistant:' inside it.  Cutting each side at its own last
    marker (as the DPO reference code does) breaks rows whose reply itself contains the
    marker; the common prefix cannot.  By construction prompt + response reproduces each
    transcript byte for byte.
    """
    cut = chosen.rfind(ASSISTANT_MARKER, 0, _common_prefix_length(chosen, rejected))
    if cut < 0:
        raise DatasetFormatError(f"{where}: chosen and rejected share no '\\n\\nAssistant:' turn, so the "
                                 "prompt cannot be found. HH transcripts must read "
                                 "'\\n\\nHuman: ...\\n\\nAssistant: reply'.")
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


_TRL_SCHEMA = ("Preference files need columns 'chosen' and 'rejected' and optionally 'prompt': "
               "all strings, or all lists of {'role', 'content'} messages.")


def _messages(value, column: str, where: str) -> List[dict]:
    """Check a conversational column: a non-empty list of {role: str, content: str}."""
    if not value:
        raise DatasetFormatError(f"{where}: column '{column}' is an empty message list. {_TRL_SCHEMA}")
    for k, message in enumerate(value, start=1):
        ok = (isinstance(message, dict) and isinstance(message.get("role"), str)
              and isinstance(message.get("content"), str))
        if not ok:
            raise DatasetFormatError(f"{where}: column '{column}', message {k} must be an object with "
                                     f"string 'role' and 'content', got {message!r:.80}. {_TRL_SCHEMA}")
    return value


def _split_implicit_text(chosen: str, rejected: str) -> Tuple[str, str, str]:
    """Prompt = common prefix, for rows without a prompt column.

    HH-style transcripts are split after the last shared '\\n\\nAssistant:'; other text is
    cut back to the last shared whitespace, so responses start with it and no word is split.
    """
    n = _common_prefix_length(chosen, rejected)
    if chosen.rfind(ASSISTANT_MARKER, 0, n) >= 0:
        return split_hh_transcripts(chosen, rejected)
    cut = max((chosen.rfind(space, 0, n) for space in (" ", "\n", "\t")), default=-1)
    cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def render_chat(tokenizer, prompt: List[dict], completion: List[dict], where: str) -> Tuple[str, str]:
    """Render (prompt text, completion text) with the chat template of `tokenizer` (or of a
    vision-language model's processor).

    The prompt is rendered with the generation prompt; the completion is the rendering of
    the whole conversation minus that prefix.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DatasetFormatError(f"{where}: conversational rows are rendered with a chat template; pass "
                                 "tokenizer= a tokenizer whose chat_template is set.")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except Exception as e:  # jinja templates raise arbitrary errors (e.g. on role order)
        raise DatasetFormatError(f"{where}: the chat template failed on this row ({type(e).__name__}: {e}).") from None
    if not full_text.startswith(prompt_text):
        raise DatasetFormatError(f"{where}: the chat template does not render the prompt (with generation "
                                 "prompt) as a prefix of the whole conversation, so the completion cannot be "
                                 "separated; use text columns instead.")
    completion_text = full_text[len(prompt_text):]
    # Templates such as ChatML end a turn with EOS and a newline ('<|im_end|>\n'): the turn's
    # EOS is the response's end, so drop what follows it rather than append a second EOS.
    eos = getattr(tokenizer, "eos_token", None) or getattr(getattr(tokenizer, "tokenizer", None), "eos_token", None)
    if eos and completion_text.rstrip().endswith(eos):  # (a VLM's processor: its tokenizer's EOS)
        completion_text = completion_text.rstrip()
    return prompt_text, completion_text


def strip_shared_prompt(prompt: List[dict], completion: List[dict]) -> List[dict]:
    """Drop the prompt messages when a completion repeats the whole conversation."""
    if len(completion) > len(prompt) and completion[:len(prompt)] == prompt:
        return completion[len(prompt):]
    return completion


def _conversational_triple(prompt, chosen, rejected, where, tokenizer) -> Tuple[str, str, str]:
    chosen, rejected = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    if prompt is None:  # implicit prompt: the shared leading messages
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DatasetFormatError(f"{where}: without a 'prompt' column, chosen and rejected must share "
                                     f"their leading (prompt) messages. {_TRL_SCHEMA}")
        prompt = chosen[:shared]
    else:
        prompt = _messages(prompt, "prompt", where)
    chosen, rejected = strip_shared_prompt(prompt, chosen), strip_shared_prompt(prompt, rejected)
    prompt_text, chosen_text = render_chat(tokenizer, prompt, chosen, where)
    _, rejected_text = render_chat(tokenizer, prompt, rejected, where)
    return prompt_text, chosen_text, rejected_text


def preference_row_to_text(row: dict, where: str, tokenizer=None) -> Tuple[str, str, str]:
    """(prompt, chosen response, rejected response) as text for one TRL-format row."""
    chosen = _field(row, "chosen", (str, list), where, _TRL_SCHEMA)
    rejected = _field(row, "rejected", (str, list), where, _TRL_SCHEMA)
    # parquet/JSON tables with some implicit-prompt rows hold a null prompt there
    prompt = _field(row, "prompt", (str, list), where, _TRL_SCHEMA) if row.get("prompt") is not None else None
    kinds = {type(v) for v in (prompt, chosen, rejected) if v is not None}
    if len(kinds) > 1:
        raise DatasetFormatError(f"{where}: mixes text and message lists across 'prompt', 'chosen' and "
                                 f"'rejected'. {_TRL_SCHEMA}")
    if isinstance(chosen, list):
        return _conversational_triple(prompt, chosen, rejected, where, tokenizer)
    if prompt is None:
        return _split_implicit_text(chosen, rejected)
    return prompt, chosen, rejected


_UNPAIRED_SCHEMA = ("Unpaired preference files (TRL's KTO format) need columns 'prompt', 'completion' and "
                    "'label' (true for a desirable completion, false for an undesirable one); prompt and "
                    "completion are strings, or lists of {'role', 'content'} messages.")
_LABEL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def is_unpaired_row(row: dict) -> bool:
    """Whether a row is in TRL's unpaired format (a 'completion' and a 'label', no chosen/rejected)."""
    return "completion" in row and "label" in row and "chosen" not in row and "rejected" not in row


def _label(value, where: str) -> bool:
    """A boolean label; 0/1 and, as CSV cells are text, 'true'/'false' (any case) and '1'/'0' too."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # JSON or parquet written with 0/1
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABEL_WORDS:
        return _LABEL_WORDS[value.strip().lower()]
    raise DatasetFormatError(f"{where}: column 'label' must be true or false, got {value!r:.40}. "
                             f"{_UNPAIRED_SCHEMA}")


def unpaired_row_to_text(row: dict, where: str, tokenizer=None) -> Tuple[str, str, bool]:
    """(prompt, completion, label) for one row of TRL's unpaired preference format (KTO's)."""
    prompt = _field(row, "prompt", (str, list), where, _UNPAIRED_SCHEMA)
    completion = _field(row, "completion", (str, list), where, _UNPAIRED_SCHEMA)
    label = _label(row["label"], where)
    if type(prompt) is not type(completion):
        raise DatasetFormatError(f"{where}: mixes text and message lists across 'prompt' and 'completion'. "
                                 f"{_UNPAIRED_SCHEMA}")
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt", where)
        completion = strip_shared_prompt(prompt, _messages(completion, "completion", where))
        prompt, completion = render_chat(tokenizer, prompt, completion, where)
    return prompt, completion, label


class _HTMLToText(HTMLParser):
    """Reduce StackExchange HTML to text: blocks separated by blank lines, <code> kept.

    Code spans are kept as ``<code>...</code>`` (as the DPO code does, since they hold real
    code); whitespace inside <pre> is preserved, elsewhere it is collapsed as a browser would.
    """

    BLOCKS = {"p", "div", "pre", "blockquote", "li", "ul", "ol", "table", "tr", "hr",
              "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: List[str] = []
        self.parts: List[str] = []
        self.pre_depth = 0

    def _flush(self):
        text = "".join(self.parts).strip()
        self.parts = []
        if text:
            self.blocks.append(text)

    def handle_starttag(self, tag, attrs):
        if tag == "br":
            self.parts.append("\n")
            return
        if tag in self.BLOCKS:
            self._flush()
        if tag == "pre":
            self.pre_depth += 1
        elif tag == "code":
            self.parts.append("<code>")

    def handle_endtag(self, tag):
        if tag == "code":
            self.parts.append("</code>")
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data):
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        self.close()
        self._flush()
        return "\n\n".join(self.blocks)


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment, keeping ``<code>`` spans (no third-party parser)."""
    parser = _HTMLToText()
    parser.feed(html)
    return parser.text()
