"""The embedded synthetic preference tasks and their ground-truth answers.

Four short tasks whose right answer is a simple function of the prompt: repeat 3-5 words,
reverse 3-6 letters, sort 3-5 distinct digits, add two single digits.  Each task has a
generator (a prompt, its right answer and a plausible mistake) and, beside it in
``SYNTHETIC_TASKS``, a solver that recovers the right answer from the prompt text alone, so
``evaluate.py`` can score any completion (``completion_credit``).

The data is generated in code (no downloads, same on every machine) from a fixed seed,
independent of any training seed: 6000 train prompts and 400 test prompts that never occur
in train, one (right, wrong) pair each.  ``preference_datasets.get_synthetic`` turns a split
into the loaders' prompt table; the embedded tokenizer is trained on ``synthetic_corpus``.
"""
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Pattern, Sequence, Tuple

from data_files import ASSISTANT_MARKER, HUMAN_MARKER

_SYNTHETIC_SEED = 20240601  # fixed: the dataset must not depend on the user's seed
SYNTHETIC_SIZES = {"train": 6000, "test": 400}
_WORDS = ("cat", "dog", "sun", "red", "box", "cup", "map", "pen", "hat", "bus",
          "egg", "fox", "ice", "jam", "key", "leg", "mud", "net", "owl", "pig")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"

Example = Tuple[str, str, str]  # (prompt, right response, wrong response)


def _swap_first_two(items: List[str]) -> List[str]:
    """The items with the first two exchanged (items are distinct, so this is always wrong)."""
    return [items[1], items[0], *items[2:]]


# ---------------------------------------------------------------------------
# Generators: (question, right items, wrong items)
# ---------------------------------------------------------------------------

# Each mistake starts at the first answer token, so telling the answers apart takes one simple
# prediction (the first word, the last letter, the smallest digit); that keeps the preference
# learnable by a ~1M-parameter model in a minute of CPU training.

def _task_copy(rng: random.Random) -> Tuple[str, List[str], List[str]]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    wrong = words[1:] if rng.random() < 0.5 else _swap_first_two(words)  # dropped item / permutation
    return "Repeat the words: " + " ".join(words), words, wrong


def _task_reverse(rng: random.Random) -> Tuple[str, List[str], List[str]]:
    letters = rng.sample(_LETTERS, rng.randint(3, 6))
    right = letters[::-1]
    wrong = list(letters) if rng.random() < 0.5 else _swap_first_two(right)  # unreversed / permutation
    return "Reverse the letters: " + " ".join(letters), right, wrong


def _task_sort(rng: random.Random) -> Tuple[str, List[str], List[str]]:
    digits = rng.sample("0123456789", rng.randint(3, 5))
    right = sorted(digits)
    unsorted_start = digits[0] != right[0]
    wrong = list(digits) if unsorted_start and rng.random() < 0.5 else _swap_first_two(right)
    return "Sort the digits: " + " ".join(digits), right, wrong


def _task_add(rng: random.Random) -> Tuple[str, List[str], List[str]]:
    a, b = rng.randrange(10), rng.randrange(10)
    total = a + b
    wrong = total + 1 if total == 0 or rng.random() < 0.5 else total - 1  # off by one
    return f"What is {a} + {b}?", [str(total)], [str(wrong)]


# ---------------------------------------------------------------------------
# The task table: each generator beside the solver of its questions
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticTask:
    """One task.

    Attributes:
        generate: rng -> (question, right items, wrong items).
        weight: relative frequency of the task among the generated prompts.
        question: matches the task's questions; group 1 holds the items, space-separated.
        solve: the items of a question -> the right answer's items.
    """
    generate: Callable[[random.Random], Tuple[str, List[str], List[str]]]
    weight: int
    question: Pattern
    solve: Callable[[List[str]], List[str]]


# addition has only 100 distinct prompts, so it is drawn less often than the open-ended tasks;
# the order and weights fix the generated data (changing them changes every split)
SYNTHETIC_TASKS = (
    SyntheticTask(_task_copy, 3, re.compile(r"Repeat the words: ([a-z ]+)$"), lambda items: items),
    SyntheticTask(_task_reverse, 3, re.compile(r"Reverse the letters: ([a-z ]+)$"),
                  lambda items: items[::-1]),
    SyntheticTask(_task_sort, 3, re.compile(r"Sort the digits: ([0-9 ]+)$"), sorted),
    SyntheticTask(_task_add, 1, re.compile(r"What is ([0-9]+ \+ [0-9]+)\?$"),
                  lambda items: [str(int(items[0]) + int(items[2]))]),
)


# ---------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------

def _synthetic_examples() -> Dict[str, List[Example]]:
    """Deterministic (prompt, right, wrong) triples per split; test prompts are held out."""
    rng = random.Random(_SYNTHETIC_SEED)
    generators = [task.generate for task in SYNTHETIC_TASKS]
    weights = [task.weight for task in SYNTHETIC_TASKS]
    wanted = sum(SYNTHETIC_SIZES.values())
    examples, seen = [], set()
    while len(examples) < wanted:
        question, right, wrong = rng.choices(generators, weights)[0](rng)
        prompt = f"{HUMAN_MARKER} {question}{ASSISTANT_MARKER}"
        if prompt not in seen:  # unique prompts, so a test prompt can never occur in train
            seen.add(prompt)
            examples.append((prompt, " " + " ".join(right), " " + " ".join(wrong)))
    n_test = SYNTHETIC_SIZES["test"]
    return {"test": examples[:n_test], "train": examples[n_test:]}


_SYNTHETIC_CACHE: Dict[str, List[Example]] = {}


def synthetic_split(split: str) -> List[Example]:
    """The (prompt, right response, wrong response) triples of one split, in a fixed order.

    Prompts are '\\n\\nHuman: QUESTION\\n\\nAssistant:'; responses start with a space.  Both
    splits are generated together on first use and kept for the life of the process.

    Raises:
        ValueError: the split is not 'train' or 'test'.
    """
    if not _SYNTHETIC_CACHE:
        _SYNTHETIC_CACHE.update(_synthetic_examples())
    if split not in _SYNTHETIC_CACHE:
        raise ValueError(f"the synthetic dataset has splits 'train' and 'test', not '{split}'.")
    return _SYNTHETIC_CACHE[split]


def synthetic_corpus() -> List[str]:
    """Every prompt+response text (right and wrong answers) of both synthetic splits.

    Used to train the embedded byte-level BPE tokenizer.
    """
    return [prompt + response
            for split in ("train", "test")
            for prompt, right, wrong in synthetic_split(split)
            for response in (right, wrong)]


# ---------------------------------------------------------------------------
# Ground truth: scoring any answer to a synthetic prompt
# ---------------------------------------------------------------------------

def synthetic_answer(prompt: str) -> List[str]:
    """The right answer (a list of items) to a synthetic-task prompt.

    Args:
        prompt: the prompt text, '\\n\\nHuman: QUESTION\\n\\nAssistant:' (or the bare question).
    Raises:
        ValueError: the prompt is not one of the embedded synthetic tasks.
    """
    question = prompt.strip()
    human, assistant = HUMAN_MARKER.strip(), ASSISTANT_MARKER.strip()
    if question.startswith(human) and question.endswith(assistant):
        question = question[len(human):-len(assistant)].strip()
    for task in SYNTHETIC_TASKS:
        match = task.question.match(question)
        if match:
            return task.solve(match.group(1).split())
    raise ValueError(f"the prompt {prompt!r} is not one of the embedded synthetic tasks")


def answer_credit(answer: Sequence[str], right: Sequence[str], partial_credit: bool) -> float:
    """1 for the right answer; with partial credit, the fraction of positions holding the right
    item over the longer of the two lists (so wrong, missing and extra items all cost), else 0."""
    if list(answer) == list(right):
        return 1.0
    if not partial_credit:
        return 0.0
    hits = sum(a == r for a, r in zip(answer, right))
    return hits / max(len(answer), len(right))


def completion_credit(prompt: str, completion: str, partial_credit: bool = True) -> float:
    """The ground-truth credit in [0, 1] of a completion (items separated by whitespace).

    Raises:
        ValueError: the prompt is not one of the embedded synthetic tasks.
    """
    return answer_credit(completion.split(), synthetic_answer(prompt), partial_credit)
