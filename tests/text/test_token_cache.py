"""The per-token top-k teacher cache (``granularity: token``) for language models.

What is read back is what the teacher gives: every batch's cached values and indices equal
``topk(log_softmax(teacher logits / T))`` on its real tokens (causal LM blocks, and masked-LM
sequences of different lengths whose padding reads as a uniform top-k). With k = V the sparse
loss on the cached batch equals the dense token loss on the live teacher, with the shift (causal)
and without (masked): the shift is the dense path's. The header states the settings; a loss
whose temperature or k differs from the header fails at start-up naming both.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from kd_lightning.data import (
    CausalLMTransferSet,
    DatasetTransferSet,
    DigitsTransferSet,
    TeacherCache,
    TeacherCacheError,
    load_tokenizer,
)
from kd_lightning.data.cache_format import read_header
from kd_lightning.data.cache_sources import token_mask
from kd_lightning.data.text import PadCollator
from kd_lightning.losses import SparseTokenDistillationLoss, TokenDistillationLoss
from kd_lightning.models import HFModel
from tests.text.conftest import corpus_texts, tiny_bert_config, tiny_gpt2_config


def _gpt2(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {**tiny_gpt2_config(vocab), "initializer_range": 0.3}
    return HFModel(model_type="gpt2", config=config, task="causal-lm").eval()


def _causal(tokenizer_dir, corpus, cache: TeacherCache | None = None) -> CausalLMTransferSet:
    return CausalLMTransferSet(tokenizer=str(tokenizer_dir), data_dir=str(corpus), block_size=16,
                               batch_size=4, shuffle_seed=0, teacher_cache=cache)  # fmt: skip


def _cache(path, teacher, **kwargs) -> TeacherCache:
    settings = dict(granularity="token", topk=8, temperature=2.0, splits=["train", "val"])
    return TeacherCache(str(path), teacher=teacher, progress=False, **{**settings, **kwargs})


def _expected_topk(teacher, batch, k, temperature):
    with torch.no_grad():
        logits = teacher(**batch["input"]).logits
    return torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1), logits


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-6), ("float16", 2e-3)])
def test_causal_lm_cache_reads_back_the_teachers_top_k(
    dtype, tolerance, tokenizer_dir, text_corpus, tmp_path
):
    teacher = _gpt2(len(load_tokenizer(tokenizer_dir)))
    cache = _cache(tmp_path / "lm.kdtc", teacher, dtype=dtype)
    data = _causal(tokenizer_dir, text_corpus, cache)
    data.prepare_data()
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        for batch in loader:
            (values, indices), _ = _expected_topk(teacher, batch, 8, 2.0)
            assert batch["teacher_topk_values"].shape == (len(batch["index"]), 16, 8)
            assert torch.equal(batch["teacher_topk_indices"], indices)
            torch.testing.assert_close(
                batch["teacher_topk_values"], values, rtol=tolerance, atol=tolerance
            )
    header = read_header(cache.path)
    tokens = sum(len(data.dataset(s)) * 16 for s in ("train", "val"))
    assert (
        header["arrays"]["train/values"]["shape"][0] + header["arrays"]["val/values"]["shape"][0]
        == tokens
    )
    assert "temperature 2" in header["stored_values"] and header["tail"] == "rest_mass"
    found = cache.provenance
    assert (found.granularity, found.topk, found.temperature, found.kind) == (
        "token", 8, 2.0, "topk"
    )  # fmt: skip


def test_k_equal_to_v_from_the_cache_is_the_dense_loss_on_the_live_teacher(
    tokenizer_dir, text_corpus, tmp_path
):
    vocab = len(load_tokenizer(tokenizer_dir))
    teacher = _gpt2(vocab)
    cache = _cache(tmp_path / "full.kdtc", teacher, topk=vocab, temperature=1.5, dtype="float32")
    data = _causal(tokenizer_dir, text_corpus, cache)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch["target"][0, 5:9] = -100  # ignored tokens are dropped on both paths
    batch["input"]["attention_mask"][1, 12:] = 0  # and so is padding
    student = torch.randn(4, 16, vocab)
    cached = (batch["teacher_topk_values"], batch["teacher_topk_indices"])
    args = dict(target=batch["target"], mask=batch["input"]["attention_mask"])
    sparse = SparseTokenDistillationLoss(temperature=1.5)(student=student, teacher=cached, **args)
    _, logits = _expected_topk(teacher, batch, vocab, 1.5)
    dense = TokenDistillationLoss(temperature=1.5)(student=student, teacher=logits, **args)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)


class MaskedLMTexts(Dataset):
    """Sentences of different lengths ([CLS] words [SEP]); labels -100 but one masked word.

    ``targets`` holds the labels padded to 20 with -100 (a transfer set stacks them to choose
    its labeled subset); :func:`_trim_and_pad` cuts them back to each sequence's length.
    """

    def __init__(self, tokenizer, texts: list[str]) -> None:
        encoded = tokenizer(texts, truncation=True, max_length=20)["input_ids"]
        self.items = [torch.tensor(ids) for ids in encoded]
        self.targets = torch.full((len(self.items), 20), -100)
        for row, ids in enumerate(self.items):
            self.targets[row, 1] = ids[1]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[i], "labels": self.targets[i]}


def _trim_and_pad(pad_token_id: int):
    collate = PadCollator(pad_token_id)
    return lambda samples: collate(
        [{**s, "labels": s["labels"][: len(s["input_ids"])]} for s in samples]
    )


def test_masked_lm_sequences_of_any_length_pad_as_a_uniform_top_k(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = [t[: 20 + 9 * i] for i, t in enumerate(corpus_texts()["sport"][:10])]
    train = MaskedLMTexts(tokenizer, texts)
    assert len({len(x) for x in train.items}) > 3  # sequences of different lengths
    torch.manual_seed(0)
    config = {**tiny_bert_config(len(tokenizer), layers=2), "initializer_range": 0.3}
    teacher = HFModel(model_type="bert", config=config, task="masked-lm").eval()
    cache = _cache(tmp_path / "mlm.kdtc", teacher, topk=5, temperature=1.0, splits=["train"],
                   dtype="float32")  # fmt: skip
    data = DatasetTransferSet(num_classes=len(tokenizer), train=train, batch_size=4,
                              collate_fn=_trim_and_pad(tokenizer.pad_token_id), teacher_cache=cache,
                              shuffle_seed=0)  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    for batch in data.train_dataloader():
        real = batch["input"]["attention_mask"].bool()
        (values, indices), logits = _expected_topk(teacher, batch, 5, 1.0)
        assert batch["teacher_topk_values"].shape[:2] == real.shape
        assert torch.equal(batch["teacher_topk_indices"][real], indices[real])
        torch.testing.assert_close(batch["teacher_topk_values"][real], values[real])
        assert (batch["teacher_topk_values"][~real] == -math.log(5)).all()
        assert (batch["teacher_topk_indices"][~real] == torch.arange(5)).all()
    # The masked LM's loss (no shift) on the cached batch is the one on the live teacher's top-k.
    student = torch.randn(*logits.shape)
    args = dict(target=batch["target"], mask=batch["input"]["attention_mask"])
    loss = SparseTokenDistillationLoss(shift=False)
    cached = loss(
        student=student,
        teacher=(batch["teacher_topk_values"], batch["teacher_topk_indices"]),
        **args,
    )
    live = loss(student=student, teacher=(values, indices), **args)
    assert cached.item() == pytest.approx(live.item(), rel=1e-6) and cached.item() > 0


def test_cache_settings_are_checked_before_any_step(tokenizer_dir, text_corpus, tmp_path):
    from kd_lightning.methods import OfflineDistillation
    from kd_lightning.objective import LossTerm
    from tests.conftest import fast_trainer

    vocab = len(load_tokenizer(tokenizer_dir))
    teacher = _gpt2(vocab)
    data = _causal(tokenizer_dir, text_corpus, _cache(tmp_path / "c.kdtc", teacher))
    data.prepare_data()
    cases = [(dict(temperature=1.0), r"temperature 2, but loss term 'kd' uses temperature 1"),
             (dict(temperature=2.0, topk=4), r"top-8 .* but loss term 'kd' expects topk=4")]  # fmt: skip
    for loss_args, match in cases:
        student = HFModel(model_type="gpt2", config=tiny_gpt2_config(vocab), task="causal-lm")
        term = LossTerm(SparseTokenDistillationLoss(**loss_args), teacher="topk", name="kd")
        module = OfflineDistillation(student, loss_terms=[term])
        with pytest.raises(TeacherCacheError, match=match):
            fast_trainer(max_steps=1).fit(module, data)
    # Another k for the cache itself: the file does not match and may not be rebuilt.
    other = _cache(tmp_path / "c.kdtc", teacher, topk=16, on_mismatch="error")
    with pytest.raises(TeacherCacheError, match="topk: the file has 8, this run expects 16"):
        _causal(tokenizer_dir, text_corpus, other).prepare_data()


def test_granularity_errors_name_the_fix(tokenizer_dir, text_corpus, tmp_path):
    teacher = _gpt2(len(load_tokenizer(tokenizer_dir)))
    with pytest.raises(ValueError, match="set topk"):
        TeacherCache(str(tmp_path / "a"), teacher=teacher, granularity="token")
    with pytest.raises(ValueError, match="granularity must be one of"):
        TeacherCache(str(tmp_path / "a"), teacher=teacher, granularity="sequence", topk=4)
    per_sample = TeacherCache(str(tmp_path / "b"), teacher=teacher, topk=4, progress=False)
    with pytest.raises(TeacherCacheError, match="set granularity: token"):
        _causal(tokenizer_dir, text_corpus, per_sample).prepare_data()
    with pytest.raises(TeacherCacheError, match="use granularity: sample here"):
        _cache(tmp_path / "c", teacher).ensure(DigitsTransferSet())
    left_padded = {"input_ids": torch.ones(2, 4, dtype=torch.long),
                   "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}  # fmt: skip
    with pytest.raises(TeacherCacheError, match="left-padded"):
        token_mask(left_padded)
