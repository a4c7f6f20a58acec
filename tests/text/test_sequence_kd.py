"""Sequence-level KD data: the teacher's greedy continuations as targets, stored and checked.

The expected continuation is recomputed here token by token (argmax of the teacher's logits on
the whole prefix), not by the library's sampler.
"""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data import GenerationsError, SequenceKDTransferSet, TeacherGenerations
from kd_lightning.models import HFModel
from tests.text.conftest import tiny_gpt2_config


def _teacher(vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_gpt2_config(vocab, layers=1, width=16)
    return HFModel(model_type="gpt2", task="causal-lm", config=config).eval()


def _data(corpus, tokenizer, path, teacher, **settings) -> SequenceKDTransferSet:
    options = dict(prompt_length=4, max_new_tokens=3, temperature=0.0, progress=False)
    options.update(settings)
    generations = TeacherGenerations(str(path), teacher=teacher, **options)
    return SequenceKDTransferSet(generations, tokenizer=str(tokenizer), data_dir=str(corpus),
                                 block_size=8, batch_size=2)  # fmt: skip


def _greedy(teacher, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt.tolist()
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(teacher(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_training_items_are_prompt_plus_the_teachers_greedy_continuation(
    text_corpus, tokenizer_dir, tmp_path
):
    from kd_lightning.data import CausalLMTransferSet, load_tokenizer

    vocab = len(load_tokenizer(tokenizer_dir))
    teacher = _teacher(vocab)
    data = _data(text_corpus, tokenizer_dir, tmp_path / "gen.kdl", teacher)
    data.prepare_data()
    data.setup("fit")
    plain = CausalLMTransferSet(tokenizer=str(tokenizer_dir), data_dir=str(text_corpus),
                                block_size=8)  # fmt: skip
    plain.setup("fit")
    train, blocks = data.dataset("train"), plain.dataset("train")
    assert len(train) == len(blocks)
    for i in range(3):
        item, block = train[i], blocks[i]
        expected = _greedy(teacher, block["input_ids"][:4], 3)
        eos = data.separator
        if eos in expected[4:]:  # after the end-of-sequence token: padding, no label
            end = expected.index(eos, 4) + 1
            expected = expected[:end] + [data.tokenizer.pad_token_id] * (7 - end)
        assert item["input_ids"].tolist() == expected
        labels = item["labels"].tolist()
        assert labels[:4] == [-100] * 4 and labels[4] == expected[4]
    # Validation stays the real text.
    assert torch.equal(data.dataset("val")[0]["input_ids"], plain.dataset("val")[0]["input_ids"])


def test_the_file_is_reused_checked_and_rebuilt_or_refused(
    text_corpus, tokenizer_dir, tmp_path, monkeypatch
):
    from kd_lightning.data import load_tokenizer

    teacher = _teacher(len(load_tokenizer(tokenizer_dir)))
    path = tmp_path / "gen.kdl"
    first = _data(text_corpus, tokenizer_dir, path, teacher)
    first.prepare_data()
    stored = path.read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again although the file is valid")

    with monkeypatch.context() as patch:
        patch.setattr(TeacherGenerations, "generate", no_generation)
        again = _data(text_corpus, tokenizer_dir, path, teacher)
        again.setup("fit")
        assert torch.equal(again.dataset("train")[0]["input_ids"],
                           first.dataset("train")[0]["input_ids"])  # fmt: skip
        # Other settings: refused (on_mismatch=error), naming the generation settings.
        other = _data(text_corpus, tokenizer_dir, path, teacher, max_new_tokens=2,
                      on_mismatch="error")  # fmt: skip
        with pytest.raises(GenerationsError, match="generation: the file has"):
            other.prepare_data()
        # Another teacher: refused, naming the teacher digest.
        stranger = _data(text_corpus, tokenizer_dir, path, _teacher(len(first.tokenizer), seed=1),
                         on_mismatch="error")  # fmt: skip
        with pytest.raises(GenerationsError, match="teacher_digest"):
            stranger.prepare_data()
    # A flipped payload byte is found; with the teacher at hand the file is rebuilt.
    corrupt = bytearray(stored)
    corrupt[80] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(GenerationsError, match="corrupt"):
        _data(text_corpus, tokenizer_dir, path, teacher, on_mismatch="error").prepare_data()
    _data(text_corpus, tokenizer_dir, path, teacher).prepare_data()
    assert path.read_bytes() == stored  # greedy decoding: the same file again


def test_prompt_must_be_shorter_than_a_block(tokenizer_dir, text_corpus, tmp_path):
    generations = TeacherGenerations(str(tmp_path / "g.kdl"), prompt_length=8)
    with pytest.raises(ValueError, match="shorter than block_size"):
        SequenceKDTransferSet(generations, tokenizer=str(tokenizer_dir),
                              data_dir=str(text_corpus), block_size=8)  # fmt: skip


def test_train_blocks_is_a_subset_of_the_training_blocks(text_corpus, tokenizer_dir, tmp_path):
    from kd_lightning.data import CausalLMTransferSet, load_tokenizer

    teacher = _teacher(len(load_tokenizer(tokenizer_dir)))
    generations = TeacherGenerations(str(tmp_path / "g.kdl"), teacher=teacher, prompt_length=4,
                                     max_new_tokens=2, progress=False)  # fmt: skip
    data = SequenceKDTransferSet(generations, tokenizer=str(tokenizer_dir),
                                 data_dir=str(text_corpus), block_size=8, train_blocks=5)  # fmt: skip
    data.setup("fit")
    plain = CausalLMTransferSet(tokenizer=str(tokenizer_dir), data_dir=str(text_corpus),
                                block_size=8)  # fmt: skip
    plain.setup("fit")
    starts = {tuple(plain.dataset("train")[i]["input_ids"][:4].tolist())
              for i in range(len(plain.dataset("train")))}  # fmt: skip
    prompts = [tuple(data.dataset("train")[i]["input_ids"][:4].tolist()) for i in range(5)]
    assert len(data.dataset("train")) == 5 and len(set(prompts)) == 5
    assert set(prompts) <= starts
