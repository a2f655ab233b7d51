"""synthetic_data: every task's generator agrees with the solver beside it in SYNTHETIC_TASKS."""
import random

import pytest

import synthetic_data as sd
from synthetic_data import SYNTHETIC_TASKS, answer_credit, completion_credit, synthetic_answer

H, A = "\n\nHuman: ", "\n\nAssistant:"
TASK_IDS = [task.generate.__name__ for task in SYNTHETIC_TASKS]


def task_of(prompt: str):
    """The one task whose question pattern matches the prompt."""
    question = prompt[len(H):-len(A)]
    matches = [task for task in SYNTHETIC_TASKS if task.question.match(question)]
    assert len(matches) == 1, prompt
    return matches[0]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS, ids=TASK_IDS)
def test_test_split_preferred_gets_full_credit_and_rejected_less(task):
    examples = [e for e in sd.synthetic_split("test") if task_of(e[0]) is task]
    assert len(examples) >= 20  # every task is drawn (addition, weight 1 of 10, ~40 times)
    for prompt, right, wrong in examples:
        assert completion_credit(prompt, right) == 1.0
        assert completion_credit(prompt, right, partial_credit=False) == 1.0
        assert completion_credit(prompt, wrong) < 1.0
        assert completion_credit(prompt, wrong, partial_credit=False) == 0.0
        # every mistake goes wrong at its first item, so partial credit never reaches 1
        assert wrong.split()[0] != synthetic_answer(prompt)[0]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS, ids=TASK_IDS)
def test_generator_and_its_solver_agree(task):
    """Straight from the generator: the solver beside it recovers the right items from the question."""
    rng = random.Random(7)
    for _ in range(300):
        question, right, wrong = task.generate(rng)
        assert task_of(H + question + A) is task
        assert synthetic_answer(H + question + A) == right == synthetic_answer(question)
        assert wrong != right


def test_partial_credit_counts_right_items_over_the_longer_list():
    assert answer_credit(["a", "b", "c"], ["a", "b", "c"], partial_credit=True) == 1.0
    assert answer_credit(["a", "x", "c"], ["a", "b", "c"], partial_credit=True) == 2 / 3
    assert answer_credit(["a", "b"], ["a", "b", "c"], partial_credit=True) == 2 / 3  # missing item
    assert answer_credit(["a", "b", "c", "d"], ["a", "b", "c"], partial_credit=True) == 3 / 4  # extra
    assert answer_credit(["b", "c"], ["a", "b", "c"], partial_credit=True) == 0.0  # shifted
    assert answer_credit(["a", "x", "c"], ["a", "b", "c"], partial_credit=False) == 0.0
    assert completion_credit(H + "Reverse the letters: q r s" + A, " s r q") == 1.0
    assert completion_credit(H + "What is 7 + 5?" + A, " 12") == 1.0


def test_unknown_prompts_and_splits_are_refused():
    with pytest.raises(ValueError, match="not one of the embedded synthetic tasks"):
        synthetic_answer(H + "Tell me a joke" + A)
    with pytest.raises(ValueError, match="splits 'train' and 'test', not 'validation'"):
        sd.synthetic_split("validation")


def test_splits_have_the_documented_sizes_and_no_shared_prompt():
    train, test = sd.synthetic_split("train"), sd.synthetic_split("test")
    assert (len(train), len(test)) == (sd.SYNTHETIC_SIZES["train"], sd.SYNTHETIC_SIZES["test"]) == (6000, 400)
    assert not {p for p, _, _ in train} & {p for p, _, _ in test}
