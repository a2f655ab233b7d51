"""What benchmarks/dpo_throughput.py and benchmarks/trl_dpo_baseline.py share, so that both
measure the same model, tokenizer and data by construction. No project imports: the TRL script
runs in its own virtual environment."""
import random

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
    """TRL-format rows of random words: prompt_len words, and responses of response_len - 1 words
    (tokenisation appends EOS), each response with a leading space to separate it from the prompt."""
    rng = random.Random(seed)

    def words(n):
        return " ".join(f"t{rng.randrange(n_words)}" for _ in range(n))

    return [{"prompt": words(prompt_len), "chosen": " " + words(response_len - 1),
             "rejected": " " + words(response_len - 1)} for _ in range(n_pairs)]
