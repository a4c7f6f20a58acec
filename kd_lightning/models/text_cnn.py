"""A convolutional network over word embeddings for text classification (Kim 2014).

Kim (2014), "Convolutional Neural Networks for Sentence Classification", section 2: each token
``i`` is an embedding ``x_i`` in R^k; a filter ``w`` in R^{h k} of width ``h`` gives one
feature per window, ``c_i = f(w . x_{i:i+h-1} + b)``; max-over-time pooling keeps
``max_i c_i`` per filter; the pooled features of filters of several widths (3, 4 and 5, 100
each) go through dropout (0.5) to a linear classifier. Tang et al. (2019), "Distilling
Task-Specific Knowledge from BERT into Simple Neural Networks", distil BERT into a BiLSTM of
this size class; the convolution is chosen here because it reads every position at once (no
step-by-step recurrence), which keeps it fast on CPUs, and because topic classes (BBC News) are
told by local n-grams, which max-over-time pooling detects wherever they occur.

Padding is masked: tokens with ``attention_mask == 0`` are zero vectors, and only windows whose
``h`` tokens are all real enter the max. A text shorter than a filter's width has one window,
the text zero-padded to that width (Kim's narrow convolution would give it none). The logits of
a text therefore do not depend on the padding its batch adds (right or left) nor on the padding
ids. Pure torch: takes the tokenized batch ``input_ids``/``attention_mask`` of any Hugging Face
tokenizer.

Embeddings start random (``N(0, 1)``, as ``nn.Embedding``) or from another model's word
embeddings (``embeddings_from``: a ``.safetensors``/``.pt`` file or a folder holding
``model.safetensors``), projected on their ``embedding_dim`` leading principal directions when
that is narrower (:func:`principal_projection`). They are trained with the rest ("non-static")
or kept fixed (``freeze_embeddings``, "static").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models.hf import resolve_path
from kd_lightning.models.spec import records_init_args

WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
"""Key of the word-embedding matrix in BERT-like checkpoints (all-MiniLM-L6-v2 among them)."""


def principal_projection(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of ``weight`` ``(V, D)``, centred, in the basis of their ``dim`` leading principal
    directions: ``(W - mean) V_dim`` with ``V_dim`` the top right singular vectors, ``(V, dim)``.

    Pairwise distances between rows are kept exactly when the rows span at most ``dim``
    dimensions around their mean, and as well as any ``dim``-dimensional map can otherwise.
    ``dim == D`` returns ``weight`` unchanged (no rotation, no centring).

    Raises:
        ValueError: ``dim`` is not in ``1..D``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a (vocabulary, width) matrix, got shape {tuple(weight.shape)}")
    width = weight.shape[1]
    if not 1 <= dim <= width:
        raise ValueError(
            f"embedding_dim={dim} cannot be projected from embeddings of width {width}: "
            f"choose embedding_dim between 1 and {width}"
        )
    if dim == width:
        return weight.clone()
    source = weight.double()
    centred = source - source.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:dim].T).to(weight.dtype)


def load_word_embeddings(source: str | Path, key: str = WORD_EMBEDDINGS) -> torch.Tensor:
    """The ``(V, D)`` matrix stored under ``key`` in a checkpoint file or model folder.

    Args:
        source: a ``.safetensors`` file, a ``torch.save`` file (``.pt``/``.bin``, loaded with
            ``weights_only=True``), or a folder holding ``model.safetensors`` or
            ``pytorch_model.bin``; ``package:<module>/<folder>`` inside an installed package.
        key: the tensor's name (BERT-like models: ``embeddings.word_embeddings.weight``; a key
            ending with it, e.g. ``bert.embeddings.word_embeddings.weight``, is found too).

    Raises:
        FileNotFoundError: no such file, or a folder without weights.
        KeyError: no tensor named ``key`` (the message lists the embedding-like keys).
    """
    path = Path(resolve_path(source))
    if path.is_dir():
        found = [
            path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()
        ]
        if not found:
            raise FileNotFoundError(
                f"{str(path)!r} holds neither model.safetensors nor pytorch_model.bin: give "
                "embeddings_from=<a weights file or a model folder>"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"embeddings_from={str(source)!r}: no such file or folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # installed with transformers (the hf extra)

        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    names = [name for name in tensors if name == key or name.endswith("." + key)]
    if len(names) != 1:
        likely = sorted(name for name in tensors if "embed" in name) or sorted(tensors)[:10]
        raise KeyError(
            f"{str(path)!r} has {'no' if not names else 'several'} tensor(s) named {key!r} "
            f"({names or 'none'}); pass embedding_key=<one of {likely}>"
        )
    return tensors[names[0]].float()


def window_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, L - width + 1)`` bool: the windows of ``width`` tokens that are all real.

    A row with no such window (fewer than ``width`` real tokens) gets its window that starts at
    its first real token (the text zero-padded to ``width``); ``mask`` ``(B, L)`` must leave
    ``width - 1`` positions after the last real token (the caller pads).
    """
    counts = F.conv1d(mask.float().unsqueeze(1), mask.new_ones(1, 1, width, dtype=torch.float))
    valid = counts.squeeze(1) >= width - 0.5
    short = ~valid.any(dim=1)
    if short.any():
        first = mask.long().argmax(dim=1)
        valid[short, first[short]] = True
    return valid


@records_init_args
class TextCNN(nn.Module):
    """Kim's (2014) CNN for text: embeddings, convolutions of several widths, max over time.

    Hookable layers: ``embedding`` ``(B, L, embedding_dim)`` (before padding is zeroed),
    ``convs.<j>`` ``(B, num_filters, L + max(kernel_sizes) - width_j)`` (pre-activation, every
    window of the input followed by ``max(kernel_sizes) - 1`` zeros),
    ``dropout`` ``(B, num_filters * len(kernel_sizes))`` (the pooled features),
    ``classifier`` ``(B, num_classes)``.

    Args:
        num_classes: number of output logits (linked from the data by the CLI).
        vocab_size: the tokenizer's vocabulary size; default: the rows of ``embeddings_from``.
        embedding_dim: width of the word embeddings (Kim: 300).
        kernel_sizes: filter widths in tokens (Kim: 3, 4, 5).
        num_filters: filters per width (Kim: 100).
        dropout: dropout on the pooled features (Kim: 0.5).
        embeddings_from: initialise the embeddings from another model's word embeddings (a
            weights file or model folder, ``package:`` paths too; see
            :func:`load_word_embeddings`), projected with :func:`principal_projection` when
            ``embedding_dim`` is narrower; ``None``: random.
        embedding_key: name of the embedding matrix in ``embeddings_from``.
        freeze_embeddings: keep the embeddings fixed (Kim's "static" variant): no gradient and
            no optimizer state for the ``vocab_size x embedding_dim`` matrix, which is most of
            the parameters and of the step time.

    Raises:
        ValueError: neither ``vocab_size`` nor ``embeddings_from``, a ``vocab_size`` that
            disagrees with ``embeddings_from``, or empty/non-positive sizes.
    """

    def __init__(
        self,
        num_classes: int = 2,
        vocab_size: int | None = None,
        embedding_dim: int = 128,
        kernel_sizes: Sequence[int] = (3, 4, 5),
        num_filters: int = 100,
        dropout: float = 0.5,
        embeddings_from: str | None = None,
        embedding_key: str = WORD_EMBEDDINGS,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        kernel_sizes = [int(k) for k in kernel_sizes]
        if not kernel_sizes or min(kernel_sizes) < 1 or num_filters < 1 or embedding_dim < 1:
            raise ValueError(
                f"kernel_sizes ({kernel_sizes}), num_filters ({num_filters}) and embedding_dim "
                f"({embedding_dim}) must be positive, e.g. kernel_sizes: [3, 4, 5]"
            )
        initial = None
        if embeddings_from is not None:
            source = load_word_embeddings(embeddings_from, embedding_key)
            if vocab_size is not None and vocab_size != source.shape[0]:
                raise ValueError(
                    f"vocab_size={vocab_size} but {embeddings_from!r} has {source.shape[0]} word "
                    "embeddings: use the tokenizer of that model and leave vocab_size unset"
                )
            vocab_size = source.shape[0]
            initial = principal_projection(source, embedding_dim)
        if vocab_size is None:
            raise ValueError(
                "TextCNN needs vocab_size (the tokenizer's size, len(tokenizer)) or "
                "embeddings_from=<the teacher's weights> to take it from"
            )
        self.num_classes = num_classes
        self.kernel_sizes = kernel_sizes
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        if initial is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(initial)
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, num_filters, k) for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_filters * len(kernel_sizes), num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of token ids ``(B, L)``; ``attention_mask`` ``(B, L)``
        marks real tokens with 1 (default: all real)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        x = self.embedding(input_ids) * mask.unsqueeze(-1)
        # Zeros after the last position (masked), so that a short text's window starting at its
        # first real token exists for every width, wherever the batch put its padding.
        extra = max(self.kernel_sizes) - 1
        x, mask = F.pad(x, (0, 0, 0, extra)), F.pad(mask, (0, extra))
        x = x.transpose(1, 2)  # (B, E, L) for Conv1d
        pooled = []
        for width, conv in zip(self.kernel_sizes, self.convs, strict=True):
            scores = conv(x).masked_fill(~window_mask(mask, width).unsqueeze(1), float("-inf"))
            pooled.append(scores.amax(dim=2))
        # ReLU is monotone, so f(max_i c_i) = max_i f(c_i): activate after pooling.
        features = torch.relu(torch.cat(pooled, dim=1))
        return self.classifier(self.dropout(features))
