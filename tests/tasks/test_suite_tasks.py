"""The learning suite's tasks (reverse, sort, count, sequence): rows the test's own solvers agree with, seeded
reproducibility, disjoint splits, noisy demonstrations, both kinds of wrong answer, their verifiers, and the
`characters` tokenizer's round trip through AutoTokenizer beside a qwen2 config (DESIGN.md pitfalls)."""

import itertools
import json
import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen2Config

from posttrain.rewards import load_reward_fn
from posttrain.tasks import SUITE_TASKS, TASKS, build_builtin_tokenizer, save_tokenizer, verifier_of
from posttrain.tasks.preference_data import feedback_rows, preference_pairs
from posttrain.tasks.problems import distant_string, swap_adjacent


def solve(prompt: str) -> str:
    """The test's own solvers, one per prompt format."""
    if match := re.fullmatch(r"rev ([a-z]+)=", prompt):
        return "".join(reversed(match.group(1)))
    if match := re.fullmatch(r"sort (\d+)=", prompt):
        return "".join(sorted(match.group(1)))
    if match := re.fullmatch(r"count ([a-z]) in ([a-z]+)=", prompt):
        return str(sum(ch == match.group(1) for ch in match.group(2)))
    if match := re.fullmatch(r"next (\d+(?:,\d+)+)=", prompt):
        terms = [int(t) for t in match.group(1).split(",")]
        step = terms[1] - terms[0]
        assert all(b - a == step for a, b in itertools.pairwise(terms)), prompt  # an arithmetic sequence
        return str(terms[-1] + step)
    raise AssertionError(f"unknown prompt format: {prompt!r}")


def test_rows_by_hand() -> None:
    # one problem of each, worked by hand
    assert solve("rev abcd=") == "dcba"
    assert solve("sort 3912=") == "1239"
    assert solve("count b in abbcab=") == "3"
    assert solve("next 4,7,10,13=") == "16"
    assert solve("next 20,15,10=") == "5"


@pytest.mark.parametrize("name", SUITE_TASKS)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_sampled_rows_are_correct(name: str, split: str) -> None:
    rows = TASKS[name]().sample(300, seed=1, split=split)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "completion", "answer"}
        assert row["completion"] == row["answer"] == solve(row["prompt"])


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_same_seed_same_rows_other_seed_other_rows(name: str) -> None:
    task = TASKS[name]()
    assert task.sample(50, seed=3) == task.sample(50, seed=3)
    assert task.sample(50, seed=3) != task.sample(50, seed=4)


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_train_and_eval_never_overlap(name: str) -> None:
    task = TASKS[name]()
    train = {r["prompt"] for r in task.sample(4000, seed=0, split="train")}
    held_out = {r["prompt"] for r in task.sample(1000, seed=0, split="eval")}
    assert len(held_out) > 200 and len(train) > 1000  # both splits hold many problems
    assert not train & held_out
    # another seed draws other problems, still on the same side of the split
    assert not {r["prompt"] for r in task.sample(1000, seed=7, split="eval")} & train


@pytest.mark.parametrize("name", [*SUITE_TASKS, "arithmetic"])
def test_noisy_demonstrations_state_a_near_miss_and_keep_the_answer(name: str) -> None:
    clean = TASKS[name]().sample(2000, seed=0)
    noisy = TASKS[name](wrong_fraction=0.3).sample(2000, seed=0)
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in clean]  # the noise has its own random stream
    assert [r["answer"] for r in noisy] == [r["answer"] for r in clean]
    wrong = [r for r in noisy if r["completion"] != r["answer"]]
    # 2000 draws at 0.3: mean 600, standard deviation 20.5; 520..680 is about 4 standard deviations
    assert 520 <= len(wrong) <= 680
    if name != "arithmetic":  # the answer column stays right, whatever the demonstration says
        assert all(r["answer"] == solve(r["prompt"]) for r in noisy)


def test_swap_adjacent_is_one_swap_away() -> None:
    rng = random.Random(0)
    for text in ("dcba", "gcigg", "0238", "ab"):
        for _ in range(20):
            wrong = swap_adjacent(text, rng, "abcdefghij0123456789")
            assert wrong != text and sorted(wrong) == sorted(text)
            differ = [i for i in range(len(text)) if wrong[i] != text[i]]
            assert len(differ) == 2 and differ[1] == differ[0] + 1  # two neighbours exchanged
    # no two neighbours differ: one character is replaced instead
    wrong = swap_adjacent("aaa", rng, "ab")
    assert sorted(wrong) == ["a", "a", "b"]


def test_distant_string_differs_in_half_the_positions() -> None:
    rng = random.Random(0)
    for text in ("dcba", "abcde", "ab"):
        for _ in range(20):
            other = distant_string(text, rng, "abcdefghij")
            assert len(other) == len(text)
            assert sum(a != b for a, b in zip(text, other)) >= max(2, (len(text) + 1) // 2)


@pytest.mark.parametrize("name", [*SUITE_TASKS, "arithmetic"])
def test_pairs_of_both_kinds(name: str) -> None:
    task = TASKS[name]()
    near = preference_pairs(task, 300, seed=0, rejected="near_duplicate")
    far = preference_pairs(task, 300, seed=0, rejected="different")
    for pair in near + far:
        assert pair["chosen"] == pair["answer"] != pair["rejected"]
    if name in ("reverse", "sort"):
        # a near duplicate has the same length and differs in exactly two neighbouring characters (a swap), or in
        # one where the answer has no two different neighbours (`aaa`)
        for pair in near:
            differ = [i for i, (a, b) in enumerate(zip(pair["chosen"], pair["rejected"], strict=True)) if a != b]
            swapped = len(differ) == 2 and differ[1] == differ[0] + 1
            assert swapped or (len(differ) == 1 and len(set(pair["chosen"])) == 1)
        for pair in far:
            differ = sum(a != b for a, b in zip(pair["chosen"], pair["rejected"], strict=True))
            assert differ >= max(2, (len(pair["chosen"]) + 1) // 2)
    else:
        gaps = {"count": 3, "sequence": 10, "arithmetic": 10}
        assert all(int(p["rejected"]) >= 0 for p in near + far if name != "arithmetic")
        if name == "count":
            assert all(abs(int(p["rejected"]) - int(p["chosen"])) == 1 for p in near)
        else:  # one digit moved by one: the difference is a power of ten
            assert all(abs(int(p["rejected"]) - int(p["chosen"])) in (1, 10, 100) for p in near)
        assert all(abs(int(p["rejected"]) - int(p["chosen"])) >= gaps[name] for p in far)


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_listwise_rows_hold_two_different_wrong_answers(name: str) -> None:
    for rejected in ("near_duplicate", "different"):
        rows = feedback_rows(TASKS[name](), 200, seed=0, split="train", kind="listwise", rejected=rejected)
        for row in rows:
            right, *wrong = row["completions"]
            assert right == row["answer"] and len(set(wrong)) == 2 and right not in wrong


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_verifier_scores_right_and_wrong_answers(name: str) -> None:
    task = TASKS[name]()
    verifier = load_reward_fn(verifier_of(name))
    rows = task.sample(50, seed=0, split="eval")
    answers = [r["answer"] for r in rows]
    rng = random.Random(0)
    assert verifier(completions=answers, answer=answers) == [1.0] * 50
    assert verifier(completions=[task.near_miss(a, rng) for a in answers], answer=answers) == [0.0] * 50
    assert verifier(completions=[task.different_answer(a, rng) for a in answers], answer=answers) == [0.0] * 50


def test_verifiers_by_hand() -> None:
    exact, numeric = load_reward_fn("exact_match"), load_reward_fn("numeric_match")
    assert verifier_of("reverse") == verifier_of("sort") == "exact_match"
    assert verifier_of("count") == verifier_of("sequence") == "numeric_match"
    assert exact(completions=["dcba", "dcab", " dcba "], answer=["dcba"] * 3) == [1.0, 0.0, 1.0]
    assert exact(completions=["0238", "238"], answer=["0238", "0238"]) == [1.0, 0.0]  # a leading zero counts
    assert numeric(completions=["3", "4", "16"], answer=["3", "3", "16"]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_bad_settings_name_the_field(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}.wrong_fraction"):
        TASKS[name](wrong_fraction=1.5)


TEXTS = ["rev abcd=dcba", "sort 3912=1239", "count b in abbcab=3", "next 4,7,10,13=16", "  two  spaces\tand a tab\n"]


@pytest.mark.parametrize("model_config", [None, "qwen2"])
def test_characters_tokenizer_round_trips_through_auto_tokenizer(tmp_path: Path, model_config: str | None) -> None:
    tokenizer = build_builtin_tokenizer("characters")
    assert len(tokenizer) == 259  # 256 bytes and 3 special tokens, no merges
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # ASCII: one token per character
        assert tokenizer.decode(ids) == text
    save_tokenizer(tokenizer, tmp_path)
    if model_config == "qwen2":
        Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=64).save_pretrained(tmp_path)  # fmt: skip
        assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in TEXTS:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.eos_token == tokenizer.eos_token and loaded.chat_template == tokenizer.chat_template


def test_every_suite_task_name_builds_the_characters_tokenizer() -> None:
    vocab = build_builtin_tokenizer("characters").get_vocab()
    assert all(build_builtin_tokenizer(name).get_vocab() == vocab for name in SUITE_TASKS)
