"""What a teacher-cache file holds and how it is read: provenance, identity, split readers.

The file is a :mod:`kd_lightning.container` file of format ``kd_lightning.teacher_cache``.
Arrays per cached split (``rows`` samples of the split, ``views`` augmented views each):

- dense: ``<split>/logits`` ``(rows, views, C)``;
- top-k: ``<split>/values`` ``(rows, views, k)`` log-probabilities at the recorded temperature
  under the full softmax (the tail's mass ``1 - sum(exp(values))`` is implied, not
  renormalised away: ``tail = "rest_mass"``) and ``<split>/indices`` (int16 or int32);
- per token (``granularity = "token"``, language models, top-k only): ``<split>/values`` and
  ``<split>/indices`` ``(tokens, k)`` for every real token (attention mask 1) of every sequence,
  sequences one after the other, and ``<split>/offsets`` ``(rows + 1,)`` int64: sequence ``i``
  is tokens ``offsets[i]:offsets[i + 1]``, positions ``0..n_i - 1`` (right padding). Positions
  are stored unshifted: position t holds the teacher's distribution there, which for a causal
  LM predicts token t + 1; the token losses apply the next-token shift exactly as they do to
  dense logits. Read back, a batch gets ``(B, L, k)`` tensors padded to its longest sequence;
  padded positions hold a uniform top-k (finite; the losses drop them by the attention mask);
- ``<split>/keys`` ``(rows,)`` uint64, for data modules whose batches carry no ``index``: a
  digest of each sample's input, so batches in any order find their rows.

The header records the provenance (:class:`CacheProvenance`): the teacher's digests, what data
and transforms the outputs were made from, and the storage kind, dtype, top-k, temperature,
tail handling and granularity (``"sample"`` or ``"token"``), plus ``stored_values``, which says
in words what the values are (raw logits, or log-probabilities at the temperature).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_lightning.container import (
    ContainerError,
    ContainerWriter,
    to_numpy,
)
from kd_lightning.container import read_header as _read_container_header
from kd_lightning.digest import module_digest
from kd_lightning.functional.sparse_soft_target import sampled_log_probs, topk_log_probs
from kd_lightning.validation import temperature as check_temperature

FORMAT = "kd_lightning.teacher_cache"
FORMAT_VERSION = 2
TAILS = {"topk": "rest_mass", "sampled": "sampled_counts"}
"""Tail handling by ``selection``: ``rest_mass``: the k largest full-softmax log-probabilities,
the rest's mass implied; ``sampled_counts``: log-frequencies of k draws from the teacher (they
sum to 1, no tail; unbiased for the forward KL only)."""
GRANULARITIES = ("sample", "token")
"""One output per sample (classification), or one per token (language models, top-k)."""

#: Storage dtypes of the values: torch dtype written to the file.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ON_MISMATCH = ("rebuild", "error")

#: Header fields that say what the cache was made from; a difference on load invalidates it.
IDENTITY_FIELDS = (
    "teacher_digest",
    "data",
    "transform",
    "views",
    "seed",
    "kind",
    "dtype",
    "topk",
    "temperature",
    "tail",
    "granularity",
    "num_classes",
)


class TeacherCacheError(RuntimeError):
    """A teacher cache that cannot be used (and cannot be rebuilt); the message says why and how to fix it."""


class InvalidCacheFile(TeacherCacheError):
    """The file is missing, truncated, corrupt, or was made from something else.

    Attributes:
        reasons: one line per problem found (``"teacher_digest: the file has ..., this run
            expects ..."``).
    """

    def __init__(self, path: Path, reasons: list[str]) -> None:
        self.path, self.reasons = path, reasons
        super().__init__(f"{path}: " + "; ".join(reasons))


def read_header(path: str | Path) -> dict[str, Any]:
    """Read and check the structure of a teacher-cache file (not the payload checksums).

    Raises:
        InvalidCacheFile: missing, truncated, corrupt, not a teacher cache, or another version.
    """
    try:
        return _read_container_header(path, FORMAT, FORMAT_VERSION)
    except ContainerError as error:
        raise InvalidCacheFile(Path(path), error.reasons) from None


def compare_identity(header: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per identity field whose value differs between a file's header and this run.

    A field this run cannot know (``None``: no teacher at hand, a data module without
    ``num_classes``) is not compared: the recorded value is trusted.
    """
    reasons = []
    for field in IDENTITY_FIELDS:
        if field in ("teacher_digest", "num_classes") and expected.get(field) is None:
            continue
        have, want = header.get(field), expected.get(field)
        if have != want:
            why = {
                "teacher_digest": " (the teacher checkpoint changed since the cache was built)",
                "data": " (the transfer set's inputs changed)",
            }.get(field, "")
            reasons.append(f"{field}: the file has {have!r}, this run expects {want!r}{why}")
    return reasons


@dataclasses.dataclass(frozen=True)
class CacheProvenance:
    """What a cache file was made from: check it against the run before any step.

    Attributes:
        path: the cache file.
        teacher_digest: identity of the teacher as it was given: SHA-256 of its checkpoint file,
            or :func:`~kd_lightning.digest.module_digest` of a module.
        teacher_module_digest: :func:`~kd_lightning.digest.module_digest` of the network that
            made the outputs (compare with the digest of a configured teacher).
        teacher_source: the checkpoint path or the teacher's class.
        kind: ``"dense"`` (logits) or ``"topk"`` (log-probabilities of the k largest classes).
        temperature: temperature of the stored top-k log-probabilities; ``None`` for dense
            logits (raw logits suit any temperature).
        topk: k, or ``None`` for dense.
        tail: top-k tail handling (``"rest_mass"``), ``None`` for dense.
        dtype: storage dtype of the values.
        num_classes: width of the teacher's output.
        views: augmented views stored per training sample.
        seed: seed of the views' augmentation parameters.
        granularity: ``"sample"`` (one output per sample) or ``"token"`` (one per token).
        splits: the cached splits.
    """

    path: str
    teacher_digest: str | None
    teacher_module_digest: str | None
    teacher_source: str | None
    kind: str
    temperature: float | None
    topk: int | None
    tail: str | None
    dtype: str
    num_classes: int | None
    views: int
    seed: int
    granularity: str
    splits: tuple[str, ...]

    @classmethod
    def from_header(cls, path: str | Path, header: dict[str, Any]) -> CacheProvenance:
        return cls(
            path=str(path),
            teacher_digest=header.get("teacher_digest"),
            teacher_module_digest=header.get("teacher_module_digest"),
            teacher_source=header.get("teacher_source"),
            kind=header["kind"],
            temperature=header.get("temperature"),
            topk=header.get("topk"),
            tail=header.get("tail"),
            dtype=header["dtype"],
            num_classes=header.get("num_classes"),
            views=header["views"],
            seed=header["seed"],
            granularity=header.get("granularity", "sample"),
            splits=tuple(s for s in ("train", "val", "test") if s in header["data"]),
        )

    @property
    def stored(self) -> str:
        """What a sparse file holds, in words (``top-64 log-probabilities``, ``64 sampled draws``)."""
        if self.tail == TAILS["sampled"]:
            return f"{self.topk} sampled draws (selection: sampled)"
        return f"the top-{self.topk} log-probabilities"

    def check_temperature(self, temperature: float, where: str = "the loss") -> None:
        """Refuse a loss temperature other than the one a top-k cache was stored at.

        Dense logits are raw and suit any temperature. Top-k values are log-probabilities at the
        stored temperature: reading them at another gives a wrong loss with no error.

        Raises:
            TeacherCacheError: naming both temperatures and the two fixes.
        """
        if self.kind != "topk" or self.temperature is None:
            return
        if not np.isclose(float(temperature), float(self.temperature), rtol=1e-6, atol=0.0):
            raise TeacherCacheError(
                f"the teacher cache {self.path} stores {self.stored} at "
                f"temperature {self.temperature:g}, but {where} uses temperature "
                f"{float(temperature):g}: set the loss temperature to {self.temperature:g}, or "
                f"rebuild the cache with temperature: {float(temperature):g}"
            )

    def check_topk(self, topk: int | None, where: str = "the loss") -> None:
        """Refuse a loss that expects another k than the top-k cache stores (``None``: any k).

        Raises:
            TeacherCacheError: naming both k and the two fixes.
        """
        if topk is None or self.kind != "topk" or self.topk is None or int(topk) == self.topk:
            return
        raise TeacherCacheError(
            f"the teacher cache {self.path} stores {self.stored} per "
            f"{self.granularity}, but {where} expects topk={int(topk)}: set the loss's topk to "
            f"{self.topk} (or leave it unset), or rebuild the cache with topk: {int(topk)}"
        )

    def check_objective(self, objective: str, where: str = "the loss") -> None:
        """Refuse a loss other than the forward KL on a sampled cache (``selection: sampled``).

        Sampled frequencies estimate the teacher's distribution without bias inside a
        cross-entropy (the forward KL) only; reverse KL, JSD and total variation need the
        teacher's probability at every token the student favours, which the draws do not give.

        Raises:
            TeacherCacheError: naming the cache, the objective and the two fixes.
        """
        if self.tail != TAILS["sampled"] or objective == "forward_kl":
            return
        raise TeacherCacheError(
            f"the teacher cache {self.path} stores {self.topk} sampled draws per "
            f"{self.granularity} (selection: sampled), an unbiased teacher only for the forward "
            f"KL, but {where} uses {objective}: use objective: forward_kl, or build the cache "
            "with selection: topk"
        )

    def check_teacher(self, teacher: nn.Module | str) -> None:
        """Refuse a configured teacher other than the one the cache was made from.

        Args:
            teacher: the configured teacher (its :func:`module_digest` is compared with the
                recorded one), or a digest.

        Raises:
            TeacherCacheError: naming both digests and the fix.
        """
        if self.teacher_module_digest is None:
            return
        digest = teacher if isinstance(teacher, str) else module_digest(teacher)
        if digest != self.teacher_module_digest:
            raise TeacherCacheError(
                f"the teacher cache {self.path} was made by the teacher with digest "
                f"{self.teacher_module_digest} ({self.teacher_source}), but the configured "
                f"teacher has digest {digest}: configure the teacher the cache was built from, "
                "or rebuild the cache from this teacher (delete the file or point "
                "teacher_cache.path elsewhere)"
            )


def check_settings(
    dtype: str,
    on_mismatch: str,
    topk: int | None,
    temperature: float,
    selection: str,
    granularity: str,
    views: int,
    seed: int,
    splits: Any,
    batch_size: int,
) -> float:
    """Check :class:`~kd_lightning.data.TeacherCache`'s settings; return the temperature.

    Raises:
        ValueError: naming the setting, the value given and the valid choices.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {list(ON_MISMATCH)}, got {on_mismatch!r}")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be >= 1 (or None for dense logits), got {topk}")
    temperature = check_temperature(temperature)
    if selection not in TAILS or (selection == "sampled" and topk is None):
        raise ValueError(f"selection must be 'topk' or 'sampled' (set topk), got {selection!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "token" and topk is None:
        raise ValueError(
            "a per-token teacher cache stores the top-k of each token: set topk (e.g. 64; "
            "dense per-token logits would take tokens x vocabulary values)"
        )
    if granularity == "token" and views != 1:
        raise ValueError(f"a per-token teacher cache stores one view (views: 1), got {views}")
    if views < 1 or batch_size < 1 or seed < 0:
        raise ValueError(
            "views and batch_size must be >= 1 and seed >= 0, got "
            f"views={views}, batch_size={batch_size}, seed={seed}"
        )
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of train/val/test, got {splits}")
    return temperature


def check_before_build(source: Any, path: Path, expected: dict[str, Any]) -> None:
    """Let the method that will read the cache refuse its settings before the teacher pass.

    A data module attached to a Trainer reaches the method (``source.trainer.lightning_module``);
    a method with ``check_teacher_cache(provenance)`` (every :class:`DistillationModule`) judges
    the planned file as it would judge the built one, so a refused setting (a temperature or
    objective the loss cannot read) costs no pass of the teacher over the data.
    """
    trainer = getattr(source, "trainer", None)
    check = getattr(getattr(trainer, "lightning_module", None), "check_teacher_cache", None)
    if callable(check):
        try:
            check(CacheProvenance.from_header(path, expected))
        except TeacherCacheError as refused:  # it speaks of the file as built: say it is not
            raise TeacherCacheError(
                f"{refused} (judged on the cache's settings before building it; nothing was "
                f"built, and any file at {path} is as it was)"
            ) from None


def stored_values(topk: int | None, temperature: float, selection: str = "topk") -> str:
    """What the stored values are, in words, for the header (``stored_values``)."""
    if not topk:
        return "raw logits (any temperature applies)"
    if selection == "sampled":
        return (
            f"log(count / {topk}) of the entries drawn in {topk} samples with replacement from "
            f"softmax(logits / {temperature:g}) (an unbiased estimate of the teacher's "
            "distribution; -inf for entries not drawn; no tail)"
        )
    return (
        f"log_softmax(logits / {temperature:g}) of the top-{topk} entries (log-probabilities at "
        f"temperature {temperature:g} under the full softmax; the rest of the mass, 1 - "
        "sum(exp(values)), is the tail bucket)"
    )


def sampled_selectors(
    topk: int, temperature: float, seed: int, device: torch.device
) -> dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Per split, the ``selection: sampled`` draws (:func:`sampled_log_probs`) of a cache build.

    Each split draws from its own stream seeded by ``(seed, split)``, consumed in the build's
    batch order: the same data, teacher, seed and batch size give the same file.
    """
    streams = {
        split: torch.Generator(device).manual_seed(3 * seed + number)
        for number, split in enumerate(("train", "val", "test"))
    }
    return {
        split: partial(sampled_log_probs, k=topk, temperature=temperature, generator=stream)
        for split, stream in streams.items()
    }


def array_layout(
    expected: dict[str, Any],
    classes: int,
    dtype: str,
    topk: int | None,
    views_of: Callable[[str], int],
    keys: bool,
    lengths: dict[str, np.ndarray] | None = None,
) -> dict[str, tuple]:
    """``{array name: (shape, dtype)}`` of a cache file (see the module docstring).

    Args:
        expected: the run's identity (its ``data`` gives the splits and their rows).
        classes: width of the teacher's output (vocabulary size per token).
        dtype: storage dtype name of the values.
        topk: k, or ``None`` for dense logits.
        views_of: views stored per sample of a split.
        keys: whether the splits get sample keys.
        lengths: real tokens per sequence by split, for a per-token cache.
    """
    storage = STORAGE_DTYPES[dtype]
    index_dtype = torch.int16 if classes <= np.iinfo(np.int16).max else torch.int32
    if topk and topk > classes:  # the header records topk: it must be what the file stores
        raise TeacherCacheError(
            f"topk: {topk} is more than the teacher's {classes} outputs per "
            f"{'token' if lengths is not None else 'sample'}: set topk <= {classes} (topk = "
            f"{classes} keeps the whole distribution), in the cache and in the loss"
        )
    k = topk or None
    arrays: dict[str, tuple] = {}
    for split, data in expected["data"].items():
        rows = data["rows"]
        if lengths is not None:
            tokens = int(lengths[split].sum())
            arrays[f"{split}/values"] = ((tokens, k), storage)
            arrays[f"{split}/indices"] = ((tokens, k), index_dtype)
            arrays[f"{split}/offsets"] = ((rows + 1,), torch.int64)
        elif k:
            arrays[f"{split}/values"] = ((rows, views_of(split), k), storage)
            arrays[f"{split}/indices"] = ((rows, views_of(split), k), index_dtype)
        else:
            arrays[f"{split}/logits"] = ((rows, views_of(split), classes), storage)
        if keys:
            arrays[f"{split}/keys"] = ((rows,), "<u8")
    return arrays


def write_outputs(
    writer: ContainerWriter,
    split: str,
    rows: torch.Tensor,
    place: tuple[int] | np.ndarray,
    logits: torch.Tensor,
    settings: tuple[str, int | None, float],
    select: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Store one teacher batch of ``split``: dense logits or their top-k log-probabilities.

    Args:
        writer: the open cache file.
        split: the split the rows belong to.
        rows: ``(B,)`` rows of the split.
        place: ``(view,)`` per sample; per token, the split's offsets (``(rows + 1,)``).
        logits: ``(B, C)`` per sample; per token, the real tokens' ``(n_1 + ... + n_B, V)`` in
            sequence order.
        settings: ``(dtype, topk, temperature)`` of the cache.
        select: logits to sparse ``(values, indices)``; default: their top-k log-probabilities.

    Raises:
        TeacherCacheError: per token, a token count other than the first pass over the data.
    """
    dtype, topk, temperature = settings
    storage = STORAGE_DTYPES[dtype]
    rows = rows.cpu().numpy()
    if isinstance(place, tuple):
        where: Any = (rows, place[0])
    else:
        if len(logits) != int((place[rows + 1] - place[rows]).sum()):
            raise TeacherCacheError(
                f"the {split} sequences changed length between two passes over the data (a "
                "per-token cache is sized by a first pass): make the data's batches deterministic"
            )
        where = np.concatenate([np.arange(place[r], place[r + 1]) for r in rows])
    if not topk:
        writer.array(f"{split}/logits")[where] = to_numpy(logits.to(storage))
        return
    select = select or (lambda x: topk_log_probs(x, topk, temperature))
    values, indices = select(logits)
    writer.array(f"{split}/values")[where] = to_numpy(values.to(storage))
    index_array = writer.array(f"{split}/indices")
    index_array[where] = indices.cpu().numpy().astype(index_array.dtype)
