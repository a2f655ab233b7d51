"""What benchmarks/dpo_throughput.py and benchmarks/trl_dpo_baseline.py share, so that both
measure the same model, tokenizer and data by construction. No project imports: the TRL script
may run in its own virtual environment.

The data are rows of random words of a word-level tokenizer (one token per word), either all of
one shape (--prompt-len, --response-len) or of the shapes listed in a lengths file
(--lengths-file, e.g. benchmarks/hh_lengths.json from make_lengths_file.py)."""
import json
import random
from pathlib import Path
from typing import List, Sequence, Tuple

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0, 1, 2, 3


def add_comparison_args(p):
    """The flags that define the compared configuration (model, data, schedule, threads)."""
    p.add_argument("--arch", choices=["llama", "gpt_neox"], default="llama")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688, help="MLP width")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size, special tokens included")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per pair")
    p.add_argument("--response-len", type=int, default=128,
                   help="tokens per chosen / rejected response, including the appended EOS")
    p.add_argument("--lengths-file", default=None,
                   help="JSON list of [prompt, chosen, rejected] token counts (responses with "
                        "their EOS), used in order and cycled; replaces --prompt-len and "
                        "--response-len")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per optimizer step")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps in all")
    p.add_argument("--warmup-steps", type=int, default=2, help="leading steps not timed")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)


def check_comparison_args(p, args):
    if args.steps <= args.warmup_steps:
        p.error("--steps must be larger than --warmup-steps")
    if args.prompt_len < 1 or args.response_len < 2:
        p.error("--prompt-len must be >= 1 and --response-len >= 2 (one word token + EOS)")
    if args.vocab <= len(SPECIAL_TOKENS) + 1:
        p.error("--vocab too small")
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    args.lengths = None
    try:
        if args.lengths_file is not None:
            args.lengths = load_lengths(args.lengths_file)
        # built here so that a shape the vocabulary cannot fill is a usage error
        args.rows = rows_of_lengths(pair_lengths(args), args.vocab - len(SPECIAL_TOKENS), args.seed)
    except ValueError as e:
        p.error(str(e))


Lengths = List[Tuple[int, int, int]]


def load_lengths(path) -> Lengths:
    """Read a lengths file: a JSON list of [prompt, chosen, rejected] token counts per pair, the
    responses counted with the EOS that tokenisation appends.

    Returns:
        the triples in file order. Raises ValueError (one line, naming the file and the fix).
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--lengths-file {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--lengths-file {path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"--lengths-file {path}: expected a non-empty JSON list of "
                         "[prompt, chosen, rejected] token counts")
    for i, entry in enumerate(data):
        ints = (isinstance(entry, list) and len(entry) == 3
                and all(isinstance(n, int) and not isinstance(n, bool) for n in entry))
        if not ints or min(entry) < 1:
            raise ValueError(f"--lengths-file {path}: entry {i} is {entry!r}; each entry must be "
                             "[prompt, chosen, rejected], three integers >= 1 (responses count "
                             "their EOS)")
        if entry[1] == entry[2] == 1:
            raise ValueError(f"--lengths-file {path}: entry {i} is {entry!r}: both responses are "
                             "only the EOS, i.e. the same sequence, a pair that training drops; "
                             "remove it")
    return [tuple(entry) for entry in data]


def cycled(lengths: Sequence[Tuple[int, int, int]], n_pairs: int) -> Lengths:
    """The first n_pairs triples of `lengths` repeated end to end."""
    return [tuple(lengths[i % len(lengths)]) for i in range(n_pairs)]


def sequence_limits(lengths: Sequence[Tuple[int, int, int]]) -> Tuple[int, int]:
    """(max_length, max_prompt_length) under which no pair is truncated: the longest prompt plus
    its longer response, and the longest prompt (always shorter, as responses have >= 1 token)."""
    return (max(p + max(c, r) for p, c, r in lengths), max(p for p, _, _ in lengths))


def pair_lengths(args) -> Lengths:
    """The [prompt, chosen, rejected] token counts of the batch * steps training pairs."""
    shapes = args.lengths or [(args.prompt_len, args.response_len, args.response_len)]
    return cycled(shapes, args.batch * args.steps)


def synchronize():
    """Wait for the CUDA kernels queued so far (nothing to wait for without CUDA): launches are
    asynchronous, so a timer read without this would miss work still running on the GPU."""
    import torch
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over 't0'..'tN' after the special tokens, `vocab_size` ids in all,
    so each synthetic word is exactly one token; no BOS/EOS added implicitly.
    Returns (tokenizer, number of words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    n_words = vocab_size - len(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": len(SPECIAL_TOKENS) + i for i in range(n_words)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok, n_words


def synthetic_rows(n_pairs: int, prompt_len: int, response_len: int, n_words: int, seed: int):
    """TRL-format rows of random words, n_pairs of them all of one shape (see rows_of_lengths)."""
    return rows_of_lengths([(prompt_len, response_len, response_len)] * n_pairs, n_words, seed)


MAX_REDRAWS = 100


def rows_of_lengths(lengths: Sequence[Tuple[int, int, int]], n_words: int,
                    seed: int) -> List[dict]:
    """TRL-format rows of random words, one per (prompt, chosen, rejected) token-count triple.

    The prompt has `prompt` words and each response `chosen - 1` / `rejected - 1` words, after a
    leading space that separates it from the prompt; the EOS that tokenisation appends makes up
    the count. Prompts are distinct (training merges rows that share a prompt) and chosen differs
    from rejected (a pair of equal texts is dropped): a clash, rare unless words are few, is
    drawn again. Raises ValueError when distinct rows cannot be drawn (too few words).
    """
    rng = random.Random(seed)
    rows, prompts = [], set()

    def words(n):
        return " ".join(f"t{rng.randrange(n_words)}" for _ in range(n))

    def draw(n, taken):
        for _ in range(MAX_REDRAWS):
            text = words(n)
            if text not in taken:
                return text
        raise ValueError(f"pair {len(rows)}: no {n}-word text unlike the earlier ones in "
                         f"{MAX_REDRAWS} draws from {n_words} words; raise --vocab")

    for prompt_len, chosen_len, rejected_len in lengths:
        prompt = draw(prompt_len, prompts)
        prompts.add(prompt)
        chosen = " " + words(chosen_len - 1)
        rejected = " " + draw(rejected_len - 1, {chosen[1:]})
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
