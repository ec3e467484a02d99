"""The reward-model scorer on a tiny random Qwen2ForSequenceClassification saved to disk."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

from posttrain.rewards import RewardSet, RewardSpec
from posttrain.rewards.reward_model import RewardModelScorer

CORPUS = ["what is two plus two?", "four", "the answer is 42", "hello world", "<think>hm</think>"]
PROMPTS = ["what is ", "q: ", "", "what is two plus ", "hello"]
COMPLETIONS = ["two plus two? four", "the answer is 42, so 42", "x", "two?", " world hello world"]


def build_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    # Byte-level BPE survives AutoTokenizer's model_type-based class choice (DESIGN.md pitfalls).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm") / "tiny_rm"
    tokenizer = build_byte_level_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def direct_scores(model_dir) -> list[float]:
    """Logit 0 of one unpadded forward per text: what the batched scorer must reproduce."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2ForSequenceClassification.from_pretrained(model_dir).eval()
    scores = []
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS, COMPLETIONS):
            ids = tokenizer(prompt + completion, add_special_tokens=False, return_tensors="pt")["input_ids"]
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores


def test_tokenizer_round_trips_through_auto_tokenizer(model_dir):
    text = "what is two plus two? four"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token == "<pad>"


def test_scores_equal_a_direct_forward_in_shape_order_and_value(model_dir):
    rewards = RewardSet.from_specs(
        [RewardSpec("reward_model", args={"path": model_dir.name, "batch_size": 2})],
        base_dir=model_dir.parent,
    )
    result = rewards.score(PROMPTS, COMPLETIONS, [[0]] * len(PROMPTS))
    scores = result.per_reward["reward_model"]
    assert scores.shape == (5,) and scores.dtype == torch.float32
    # batch_size 2 over texts of different lengths: padding and the length sort must not change a score
    torch.testing.assert_close(scores, torch.tensor(direct_scores(model_dir)), atol=1e-5, rtol=1e-5)
    assert len(set(scores.tolist())) == 5  # a random head still tells the five texts apart


def test_scores_are_deterministic_and_do_not_depend_on_batch_size(model_dir):
    one = RewardModelScorer(path=str(model_dir), batch_size=1)
    five = RewardModelScorer(path=str(model_dir), batch_size=5)
    first = five(prompts=PROMPTS, completions=COMPLETIONS)
    assert five(prompts=PROMPTS, completions=COMPLETIONS) == first
    torch.testing.assert_close(torch.tensor(one(prompts=PROMPTS, completions=COMPLETIONS)), torch.tensor(first))
    assert not five.model.training  # eval mode: no dropout, so repeated scoring agrees


def test_conversations_are_rendered_with_the_chat_template(model_dir):
    scorer = RewardModelScorer(path=str(model_dir))
    scorer.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conversational = scorer(
        prompts=[[{"role": "user", "content": "what is "}]],
        completions=[[{"role": "assistant", "content": "two plus two? four"}]],
    )
    # this template just concatenates contents, so it must score as the plain text does
    assert conversational == pytest.approx(scorer(prompts=["what is "], completions=["two plus two? four"]))


def test_missing_model_directory_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory 'absent' not found \(looked in .*absent"):
        RewardModelScorer(path="absent", base_dir=tmp_path)
