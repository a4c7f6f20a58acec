"""The sampled sparse teacher (``selection: sampled``; Anshumann et al. 2025).

The property the method rests on, derived from the draws themselves rather than from the code:
k draws with replacement from p give frequencies whose expectation is p, so the forward-KL
gradient from them is an unbiased estimate of the dense gradient (while top-k is biased toward
the head). Tested by averaging over many independent rows, with a tolerance of several
standard errors of the binomial frequencies. The cache stores those frequencies, seeded, states
them in its header, and refuses objectives the draws cannot estimate, before any step.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.data import TeacherCache, TeacherCacheError, load_tokenizer
from kd_lightning.data.cache_format import read_header
from kd_lightning.functional import sampled_log_probs, topk_log_probs
from kd_lightning.functional.token_sparse import sparse_token_divergence
from kd_lightning.losses import SparseTokenDistillationLoss
from kd_lightning.models import HFModel
from tests.text.conftest import tiny_gpt2_config
from tests.text.test_token_cache import _cache, _causal, _gpt2


def test_frequencies_are_counts_over_k_on_distinct_entries():
    logits = torch.randn(3, 5, 50)
    values, indices = sampled_log_probs(logits, 16, 2.0, torch.Generator().manual_seed(0))
    assert values.shape == indices.shape == (3, 5, 16)
    counts = values.exp() * 16
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-5)
    torch.testing.assert_close(values.exp().sum(-1), torch.ones(3, 5))  # no tail
    assert all(len(set(row.tolist())) == 16 for row in indices.reshape(-1, 16))
    drawn = torch.isfinite(values)
    assert (drawn.sum(-1) >= 1).all() and not torch.isnan(values).any()
    # k above the vocabulary keeps every class once.
    assert sampled_log_probs(torch.randn(2, 4), 9)[0].shape == (2, 4)


def test_frequencies_are_an_unbiased_estimate_and_top_k_is_not():
    torch.manual_seed(0)
    vocab, k, rows, temperature = 40, 8, 20000, 1.5
    logits = torch.randn(vocab, dtype=torch.float64) * 2
    p = torch.softmax(logits / temperature, dim=-1)
    values, indices = sampled_log_probs(
        logits.expand(rows, vocab), k, temperature, torch.Generator().manual_seed(1)
    )
    frequencies = torch.zeros(rows, vocab, dtype=torch.float64).scatter_(-1, indices, values.exp())
    mean = frequencies.mean(0)
    standard_error = (p * (1 - p) / (k * rows)).sqrt()
    assert ((mean - p).abs() <= 5 * standard_error + 1e-12).all()
    # The forward-KL gradient from the draws, averaged, is the dense gradient (q - p) / T:
    student = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    loss = sparse_token_divergence(
        student.expand(rows, vocab), values, indices, shift=False, temperature=temperature,
        scale_by_t2=False,
    )  # fmt: skip
    (gradient,) = torch.autograd.grad(loss, student)
    dense = (torch.softmax(student.detach() / temperature, -1) - p) / temperature
    assert (gradient - dense).abs().max() <= 5 * standard_error.max() / temperature
    # The top-k teacher (the rest as one bucket) moves the student's tail the student's way,
    # not the teacher's: its gradient differs from the dense one by far more than that.
    top_values, top_indices = topk_log_probs(logits.expand(1, vocab), k, temperature)
    top = sparse_token_divergence(
        student[None], top_values, top_indices, shift=False, temperature=temperature,
        scale_by_t2=False,
    )  # fmt: skip
    (top_gradient,) = torch.autograd.grad(top, student)
    assert (top_gradient - dense).abs().max() > 20 * standard_error.max() / temperature


def test_sampled_cache_stores_seeded_frequencies_and_says_so(tokenizer_dir, text_corpus, tmp_path):
    teacher = _gpt2(len(load_tokenizer(tokenizer_dir)))
    paths = [tmp_path / "a.kdtc", tmp_path / "b.kdtc"]
    for path in paths:
        cache = _cache(path, teacher, selection="sampled", dtype="float32")
        data = _causal(tokenizer_dir, text_corpus, cache)
        data.prepare_data()
    assert paths[0].read_bytes() == paths[1].read_bytes()  # the same seed, the same draws
    header = read_header(paths[0])
    assert header["tail"] == "sampled_counts" and "8 samples" in header["stored_values"]
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    values = batch["teacher_topk_values"]
    torch.testing.assert_close(values.exp().sum(-1), torch.ones(values.shape[:-1]))
    counts = values.exp() * 8
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-5)
    # Another seed draws other samples; a top-k cache at that path is stale, not reused.
    other = _cache(paths[0], teacher, selection="sampled", dtype="float32", seed=1)
    _causal(tokenizer_dir, text_corpus, other).prepare_data()
    assert paths[0].read_bytes() != paths[1].read_bytes()
    stale = _cache(paths[1], teacher, on_mismatch="error")
    with pytest.raises(TeacherCacheError, match="tail: the file has 'sampled_counts'"):
        _causal(tokenizer_dir, text_corpus, stale).prepare_data()


def test_objectives_the_draws_cannot_estimate_are_refused_before_any_step(
    tokenizer_dir, text_corpus, tmp_path
):
    from kd_lightning.methods import OfflineDistillation
    from kd_lightning.objective import LossTerm
    from tests.conftest import fast_trainer

    vocab = len(load_tokenizer(tokenizer_dir))
    # Before the file exists: refused before the teacher runs, and nothing is written.
    fresh = _cache(tmp_path / "fresh.kdtc", _gpt2(vocab), selection="sampled")
    student = HFModel(model_type="gpt2", config=tiny_gpt2_config(vocab), task="causal-lm")
    loss = SparseTokenDistillationLoss(objective="reverse_kl", temperature=2.0)
    module = OfflineDistillation(student, loss_terms=[LossTerm(loss, teacher="topk")])
    with pytest.raises(TeacherCacheError, match="uses reverse_kl: use objective: forward_kl"):
        fast_trainer(max_steps=1).fit(module, _causal(tokenizer_dir, text_corpus, fresh))
    assert not fresh.path.exists() and not list(tmp_path.glob(".fresh*"))
    cache = _cache(tmp_path / "s.kdtc", _gpt2(vocab), selection="sampled")
    data = _causal(tokenizer_dir, text_corpus, cache)
    data.prepare_data()
    for objective, beta in [("reverse_kl", 0.5), ("jsd", 0.5), ("total_variation", 0.5)]:
        student = HFModel(model_type="gpt2", config=tiny_gpt2_config(vocab), task="causal-lm")
        loss = SparseTokenDistillationLoss(objective=objective, beta=beta, temperature=2.0)
        module = OfflineDistillation(student, loss_terms=[LossTerm(loss, teacher="topk")])
        trainer = fast_trainer(max_steps=1)
        with pytest.raises(
            TeacherCacheError, match=rf"uses {objective}: use objective: forward_kl"
        ):
            trainer.fit(module, data)
        assert trainer.global_step == 0
    # The JSD at beta 0 is the forward KL: accepted, and it trains.
    loss = SparseTokenDistillationLoss(objective="jsd", beta=0.0, temperature=2.0)
    student = HFModel(model_type="gpt2", config=tiny_gpt2_config(vocab), task="causal-lm")
    module = OfflineDistillation(student, loss_terms=[LossTerm(loss, teacher="topk")])
    trainer = fast_trainer(max_steps=2)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and math.isfinite(trainer.callback_metrics["train/loss"])


def test_selection_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="selection must be 'topk' or 'sampled'"):
        TeacherCache(str(tmp_path / "a"), teacher=torch.nn.Linear(2, 2), selection="random")
    with pytest.raises(ValueError, match=r"\(set topk\)"):
        TeacherCache(str(tmp_path / "a"), teacher=torch.nn.Linear(2, 2), selection="sampled")


def test_topk_above_the_vocabulary_is_refused_at_build_naming_one_number(
    tokenizer_dir, text_corpus, tmp_path
):
    # The header records topk; the file may not hold fewer entries than it says (a loss asking
    # for the header's k and one asking for the stored k would each be sent to the other).
    vocab = len(load_tokenizer(tokenizer_dir))
    for selection in ("topk", "sampled"):
        cache = _cache(tmp_path / f"{selection}.kdtc", _gpt2(vocab), topk=vocab + 1,
                       selection=selection)  # fmt: skip
        with pytest.raises(TeacherCacheError, match=rf"topk: {vocab + 1} is more than the "
                           rf"teacher's {vocab} outputs per token: set topk <= {vocab}"):  # fmt: skip
            _causal(tokenizer_dir, text_corpus, cache).prepare_data()
        assert not (tmp_path / f"{selection}.kdtc").exists()


def test_temperatures_outside_the_useful_range_are_refused_by_cache_and_loss(tmp_path):
    for temperature in (1e-45, 0.0, float("inf"), float("nan"), 2e4):
        with pytest.raises(ValueError, match="temperature must be"):
            TeacherCache(str(tmp_path / "a"), teacher=torch.nn.Linear(2, 2), topk=2,
                         selection="sampled", temperature=temperature)  # fmt: skip
        with pytest.raises(ValueError, match="temperature must be"):
            SparseTokenDistillationLoss(temperature=temperature)


def test_refusals_on_a_sampled_cache_say_draws(tokenizer_dir, text_corpus, tmp_path):
    from kd_lightning.methods import OfflineDistillation
    from kd_lightning.objective import LossTerm
    from tests.conftest import fast_trainer

    vocab = len(load_tokenizer(tokenizer_dir))
    data = _causal(tokenizer_dir, text_corpus, _cache(tmp_path / "s.kdtc", _gpt2(vocab),
                                                      selection="sampled"))  # fmt: skip
    data.prepare_data()
    student = HFModel(model_type="gpt2", config=tiny_gpt2_config(vocab), task="causal-lm")
    loss = SparseTokenDistillationLoss(temperature=1.0)
    module = OfflineDistillation(student, loss_terms=[LossTerm(loss, teacher="topk", name="kd")])
    with pytest.raises(TeacherCacheError, match=r"stores 8 sampled draws \(selection: sampled\) "
                       r"at temperature 2, but loss term 'kd' uses temperature 1"):  # fmt: skip
        fast_trainer(max_steps=1).fit(module, data)
