"""TextCNN (Kim 2014): values worked by hand, padding invariance, embedding initialisation.

Expected values come from the paper's equations on numbers small enough to do by hand, or from
properties (a text's logits equal those of the text alone; a PCA of rank-d rows keeps their
distances), never from the model's own earlier output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.models import TextCNN
from kd_lightning.models.text_cnn import load_word_embeddings, principal_projection


def _hand_model(widths=(2,), bias: float = -0.5) -> TextCNN:
    """Embedding of token t is the number t (width 1), every filter sums its window, plus bias;
    one logit that copies the pooled feature."""
    model = TextCNN(num_classes=1, vocab_size=10, embedding_dim=1, kernel_sizes=widths,
                    num_filters=1, dropout=0.0)  # fmt: skip
    with torch.no_grad():
        model.embedding.weight.copy_(torch.arange(10.0).unsqueeze(1))
        for conv in model.convs:
            conv.weight.fill_(1.0)
            conv.bias.fill_(bias)
        model.classifier.weight.fill_(1.0)
        model.classifier.bias.zero_()
    return model.eval()


def test_max_over_time_of_real_windows_by_hand():
    model = _hand_model()
    ids = torch.tensor([[1, 2, 3, 9, 9], [9, 9, 4, 1, 0], [7, 9, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    logits = model(ids, mask).squeeze(1)
    # Row 0: windows (1+2), (2+3) -> max 5, minus 0.5. Counting padding (id 9) would give 11.5.
    # Row 1 (left padding): windows (4+1), (1+0) -> 5 - 0.5.
    # Row 2: one token, shorter than the filter: the window [7, 0] -> 7 - 0.5.
    assert logits.tolist() == [4.5, 4.5, 6.5]
    # ReLU: a window sum below the bias gives 0 (f = max(0, .)).
    assert model(torch.tensor([[0, 0]])).item() == 0.0


def test_several_widths_concatenate_their_features():
    model = TextCNN(num_classes=2, vocab_size=10, embedding_dim=1, kernel_sizes=(1, 3),
                    num_filters=1, dropout=0.0).eval()  # fmt: skip
    with torch.no_grad():
        model.embedding.weight.copy_(torch.arange(10.0).unsqueeze(1))
        for conv in model.convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        model.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.classifier.bias.zero_()
    # tokens 2, 5, 1: width 1 -> max 5; width 3 -> the one window 2 + 5 + 1 = 8
    assert model(torch.tensor([[2, 5, 1]])).tolist() == [[5.0, 8.0]]


def test_logits_of_a_padded_batch_equal_each_text_alone():
    torch.manual_seed(0)
    model = TextCNN(num_classes=4, vocab_size=50, embedding_dim=8, kernel_sizes=(2, 3, 5),
                    num_filters=6).eval()  # fmt: skip
    texts = [torch.randint(1, 50, (n,)) for n in (9, 4, 1, 6)]  # two shorter than width 5
    alone = torch.cat([model(t.unsqueeze(0)) for t in texts])
    for left in (False, True):
        ids = torch.randint(0, 50, (4, 12))  # padding ids are arbitrary tokens
        mask = torch.zeros(4, 12, dtype=torch.long)
        for row, text in enumerate(texts):
            start = 12 - len(text) if left else 0
            ids[row, start : start + len(text)] = text
            mask[row, start : start + len(text)] = 1
        torch.testing.assert_close(model(ids, mask), alone, rtol=1e-5, atol=1e-6)


def test_padding_positions_get_no_gradient():
    torch.manual_seed(0)
    model = TextCNN(num_classes=3, vocab_size=20, embedding_dim=4, num_filters=5)
    ids = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [8, 9, 10, 11, 12, 13, 14]])
    mask = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    model(ids, mask).sum().backward()
    grad = model.embedding.weight.grad
    assert grad[0].abs().sum() == 0  # token 0 only ever sits at padded positions
    assert grad[3:15].abs().sum(dim=1).gt(0).sum() >= 1


def test_principal_projection_keeps_distances_of_rank_d_rows():
    torch.manual_seed(0)
    basis = torch.randn(2, 6, dtype=torch.float64)
    rows = torch.randn(30, 2, dtype=torch.float64) @ basis + torch.randn(6, dtype=torch.float64)
    projected = principal_projection(rows, 2)
    assert projected.shape == (30, 2)
    torch.testing.assert_close(torch.cdist(projected, projected), torch.cdist(rows, rows))
    torch.testing.assert_close(projected.mean(dim=0), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(principal_projection(rows, 6), rows)  # full width: unchanged
    with pytest.raises(ValueError, match="between 1 and 6"):
        principal_projection(rows, 7)


def test_embeddings_from_a_weights_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weight = torch.randn(12, 4)
    save_file({"bert.embeddings.word_embeddings.weight": weight, "other": torch.ones(2)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    model = TextCNN(num_classes=3, embeddings_from=str(tmp_path), embedding_dim=4)
    assert torch.equal(model.embedding.weight.detach(), weight)  # vocab 12 taken from the file
    narrow = TextCNN(num_classes=3, embeddings_from=str(tmp_path), embedding_dim=2)
    centred = weight.double() - weight.double().mean(dim=0)
    # the projection keeps the two largest principal variances: the top squared singular values
    top = torch.linalg.svdvals(centred)[:2] ** 2
    kept = (narrow.embedding.weight.detach().double() ** 2).sum(dim=0)
    torch.testing.assert_close(kept.sort(descending=True).values, top, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_size=30 but .* has 12 word embeddings"):
        TextCNN(num_classes=3, vocab_size=30, embeddings_from=str(tmp_path), embedding_dim=4)
    with pytest.raises(KeyError, match="embedding_key"):
        load_word_embeddings(tmp_path / "model.safetensors", key="no.such.weight")
    with pytest.raises(ValueError, match="needs vocab_size"):
        TextCNN(num_classes=3)


def test_bbc_textcnn_configs_fit_as_slices(tiny_minilm_dir, text_corpus, tmp_path, monkeypatch):
    """experiments/text/bbc_textcnn_{alone,distil}.yaml through ``kd-lightning fit``, shrunk as
    tests/text/test_text_experiments.py shrinks every text config (embeddings 16 wide: the
    stand-in MiniLM is 32 wide); the distilled run reads the teacher its config names."""
    import csv

    import yaml

    from kd_lightning.cli import main as cli_main
    from kd_lightning.teachers import load_student
    from tests.text.test_text_experiments import _slice

    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "-c", str(_slice("bbc_teacher", tiny_minilm_dir, text_corpus))])
    for name in ("bbc_textcnn_alone", "bbc_textcnn_distil"):
        path = _slice(name, tiny_minilm_dir, text_corpus)
        config = yaml.safe_load(path.read_text())
        model = config["model"]["init_args"]
        (model.get("model") or model["student"])["init_args"]["embedding_dim"] = 16
        path.write_text(yaml.safe_dump(config))
        cli_main(["fit", "-c", str(path)])
        student = load_student(sorted(Path(f"runs/text/{name}").rglob("*.ckpt"))[-1])
        assert isinstance(student, TextCNN) and student.embedding.weight.shape[1] == 16
        assert not student.embedding.weight.requires_grad  # the configs keep embeddings fixed
        rows = list(csv.DictReader(open(f"runs/text/{name}/version_0/metrics.csv")))
        logged = {k for row in rows for k, v in row.items() if v}
        assert "val/acc" in logged
        if name == "bbc_textcnn_distil":
            assert {"train/loss_kd_step", "val/agreement"} <= logged
