"""kd_lightning.generation: prompts, sampling, masks, teacher NLL and distinct-n, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_lightning.generation import (
    DistinctNGrams,
    choose_tokens,
    derive_seed,
    distinct_n,
    left_aligned_prompts,
    prompt_lengths,
    sample_continuations,
    seeded_generator,
    teacher_token_nll,
)


class NextToken(nn.Module):
    """A causal 'LM' whose logits at position t put 10 on token (x_t + 1) mod V: greedy decoding
    counts upwards, wrapping at V."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls: list[int] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.shape[1])
        return {"logits": 10.0 * nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab)}


def test_distinct_n_by_hand():
    assert distinct_n([[1, 2, 1, 2]], 1) == 2 / 4
    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3  # (1,2) (2,1) (1,2)
    # n-grams never span two samples; repeats across samples count once among distinct ones
    assert distinct_n([[1, 2], [1, 2, 3]], 1) == 3 / 5
    assert distinct_n([[1, 2], [1, 2, 3]], 2) == 2 / 3  # (1,2) (1,2) (2,3)
    assert math.isnan(distinct_n([[7], []], 2))
    with pytest.raises(ValueError, match="n must be"):
        distinct_n([[1]], 0)


def test_distinct_metric_leaves_masked_tokens_out():
    metric = DistinctNGrams((1, 2))
    metric.update(torch.tensor([[1, 2, 9]]), torch.tensor([[1, 1, 0]]))
    metric.update(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]]))
    assert metric.compute() == {"distinct_1": 3 / 5, "distinct_2": 2 / 3}


def test_prompts_are_moved_to_the_right_edge():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    lengths = prompt_lengths(mask, prompt_length=3)
    assert lengths.tolist() == [3, 2]
    prompt, prompt_mask = left_aligned_prompts(ids, lengths, 3, pad_token_id=0)
    assert prompt.tolist() == [[1, 2, 3], [0, 5, 6]]
    assert prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    # Without prompt_length: the tokens labeled -100 before the first label are the prompt.
    target = torch.tensor([[-100, -100, 3, 4], [-100, 6, -100, -100]])
    assert prompt_lengths(mask, target, None).tolist() == [2, 1]


def test_greedy_continuations_masks_and_labels():
    model = NextToken()
    prompt = torch.tensor([[0, 1, 2], [0, 0, 6]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = sample_continuations(model, prompt, mask, max_new_tokens=4, temperature=0.0,
                               eos_token_id=4, pad_token_id=0)  # fmt: skip
    # Row 0 counts 3, 4 (EOS: kept), then padding; row 1 counts 7, 0, 1, 2 (wrapping at 8).
    assert out.generated.tolist() == [[3, 4, 0, 0], [7, 0, 1, 2]]
    assert out.generated_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out.target.tolist() == [
        [-100, -100, -100, 3, 4, -100, -100],
        [-100, -100, -100, 7, 0, 1, 2],
    ]
    assert out.position_ids[1].tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert model.calls == [3, 4, 5, 6]  # no cache: the whole sequence each step, exactly 4 steps


def test_cache_gives_the_same_samples_as_the_whole_sequence():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=20)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompt = torch.tensor([[0, 0, 3, 4], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    runs = [
        sample_continuations(model, prompt, mask, max_new_tokens=6, temperature=1.0,
                             generator=seeded_generator("cpu", 1, "x"), use_cache=cache)
        for cache in (True, False)
    ]  # fmt: skip
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    # Left padding with position ids: row 0 continues as if its prompt were [3, 4] alone.
    alone = sample_continuations(model, prompt[:1, 2:], mask[:1, 2:], max_new_tokens=6,
                                 temperature=0.0)  # fmt: skip
    padded = sample_continuations(model, prompt, mask, max_new_tokens=6, temperature=0.0)
    assert torch.equal(alone.generated[0], padded.generated[0])


def test_sampling_follows_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(40000, 1)
    tokens = choose_tokens(logits, 2.0, seeded_generator("cpu", 0))
    freq = torch.bincount(tokens, minlength=3).double() / len(tokens)
    assert torch.allclose(freq, torch.softmax(logits[0].double() / 2.0, -1), atol=0.01)
    # A padded vocabulary: ids from vocab_size on are never drawn.
    wide = torch.zeros(1000, 5)
    wide[:, 3:] = 50.0
    assert choose_tokens(wide, 1.0, seeded_generator("cpu", 0), vocab_size=3).max() < 3


def test_seeds_are_a_function_of_their_keys():
    assert derive_seed(0, "train", 3) == derive_seed(0, "train", 3)
    assert len({derive_seed(0, "train", s) for s in range(100)}) == 100
    a = torch.rand(3, generator=seeded_generator("cpu", 0, "train", 5))
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3, generator=seeded_generator("cpu", 0, "train", 5)))


def test_teacher_nll_by_hand():
    # Position 0 predicts token 1 with p = e^2 / (e^2 + 2); position 1 predicts a -100 label.
    logits = torch.tensor([[[0.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    target = torch.tensor([[-100, 1, -100]])
    nll, weight = teacher_token_nll(logits, target)
    assert weight.tolist() == [[1.0, 0.0]]
    assert nll[0, 0].item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + 2)), rel=1e-6)
    assert nll[0, 1].item() == 0.0
