"""Fixtures of the text tests: a tiny 5-class corpus in class folders (BBC News' layout), a
word-level tokenizer trained on it with ``tokenizers``, and tiny Hugging Face models built from
their configs (no download anywhere). Skipped, with the install command, without the hf extra."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")

CLASSES = ("business", "entertainment", "politics", "sport", "tech")
WORDS = {
    "business": "shares profits market bank economy firm",
    "entertainment": "film music star award show actor",
    "politics": "minister election party vote labour government",
    "sport": "match team cup goal player coach",
    "tech": "software phone internet computer users digital",
}
SHARED = "the a of and to in said on for with".split()
PER_CLASS = 12


def corpus_texts(seed: int = 0) -> dict[str, list[str]]:
    """``{class: documents}``: each document mixes its class's words with shared words."""
    rng = random.Random(seed)
    texts = {}
    for name in CLASSES:
        own = WORDS[name].split()
        texts[name] = [
            " ".join(
                rng.choice(own if rng.random() < 0.5 else SHARED)
                for _ in range(rng.randint(12, 24))
            )
            for _ in range(PER_CLASS)
        ]
    return texts


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """``<root>/<class>/<n>.txt``: 12 documents per class, plus one exact duplicate in
    ``business`` and one Latin-1 file (a pound sign) in ``tech``."""
    root = tmp_path_factory.mktemp("corpus")
    for name, docs in corpus_texts().items():
        (root / name).mkdir()
        for i, text in enumerate(docs):
            (root / name / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    (root / "business" / "999.txt").write_text(corpus_texts()["business"][0], encoding="utf-8")
    (root / "tech" / "000.txt").write_bytes("users paid \xa35 for the phone".encode("latin-1"))
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer ([CLS] text [SEP]) trained on the corpus, saved as a directory."""
    from kd_lightning.data import train_tokenizer

    texts = [t for docs in corpus_texts().values() for t in docs] + ["users paid \xa35"]
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, directory, vocab_size=200, kind="wordlevel", add_cls_sep=True)
    return directory


def tiny_bert_config(vocab_size: int, layers: int = 6) -> dict:
    return dict(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=64)  # fmt: skip


def tiny_gpt2_config(vocab_size: int | None = None, layers: int = 2, width: int = 32) -> dict:
    config = dict(n_layer=layers, n_embd=width, n_head=2, n_positions=64,
                  bos_token_id=5, eos_token_id=5, pad_token_id=0)  # fmt: skip
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return config


@pytest.fixture(scope="session")
def tiny_minilm_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A stand-in for all-MiniLM-L6-v2's directory: a 6-layer BERT (hidden 32, random weights,
    no head) and the corpus tokenizer, both saved with ``save_pretrained``."""
    import torch
    import transformers

    from kd_lightning.data import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = transformers.BertConfig(**tiny_bert_config(len(tokenizer)))
    directory = tmp_path_factory.mktemp("tiny_minilm")
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
