"""Teacher-output cache: run the teacher once over the transfer set, train from a file.

Offline distillation spends most of its compute on the teacher's forward pass although the
teacher never changes (Hinton et al. 2015 already note the soft targets can be precomputed).
:class:`TeacherCache` writes the teacher's outputs to one memory-mapped file
(:mod:`kd_lightning.data.cache_format`); the library's transfer sets put them in every batch
(``teacher_logits``, or ``teacher_topk_values`` / ``teacher_topk_indices``), and
:meth:`TeacherCache.lookup` finds them for a batch of any other data module, so the teacher is
neither run nor loaded during training.

Sources: a :class:`~kd_lightning.data.TransferSetDataModule` (its splits are read as tensors,
transformed on the device, and optionally cached as several augmented views); any other
LightningDataModule, or a dict of DataLoaders / map-style datasets, whose batches are dicts or
``(input, target)`` tuples (one output per sample, rows in dataset order, plus a content key
per sample for batches that carry no ``index``).

Language models (``granularity="token"``): per real token, the top-k log-probabilities of the
teacher's ``(B, L, V)`` logits, the rest of the mass one implied bucket
(:mod:`kd_lightning.functional.token_sparse`), or the frequencies of k draws from the teacher
(``selection="sampled"``); batches get ``(B, L, k)`` entries.

Augmentation-aware (unlike caches keyed by sample index only): with a random training
augmentation the file stores ``views`` outputs per sample, view ``k`` of sample ``i`` being
the image whose augmentation parameters are drawn from ``(seed, i, k)``
(:func:`kd_lightning.data.augment.params_for`); training replays exactly those views.

The header records what the outputs were made from (:class:`CacheProvenance`). On load every
identity field is compared with the current run and every payload chunk is checked, so a
changed teacher or data set, a flipped byte or a truncated file is detected; the cache is then
rebuilt when the teacher is available, or refused with a message naming the mismatch and the
fix. Writes are atomic (temporary file, fsync, ``os.replace``) and replace only an earlier
teacher cache, never an input or another file (:mod:`kd_lightning.data.cache_path_guard`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import kd_lightning.data.cache_sources as cache_sources
from kd_lightning.container import (
    PREAMBLE_SIZE,
    TRAILER,
    ContainerError,
    ContainerWriter,
    array_specs,
    verify_payload,
)
from kd_lightning.data.batch import normalise_batch
from kd_lightning.data.cache_format import (
    FORMAT,
    FORMAT_VERSION,
    TAILS,
    CacheProvenance,
    InvalidCacheFile,
    TeacherCacheError,
    array_layout,
    check_before_build,
    check_settings,
    compare_identity,
    read_header,
    sampled_selectors,
    stored_values,
    write_outputs,
)
from kd_lightning.data.cache_path_guard import refuse_aliased_inputs, refuse_replacing_other_files
from kd_lightning.data.cache_reader import SplitOutputs, sample_keys
from kd_lightning.data.teacher_source import TeacherSource
from kd_lightning.digest import module_digest, tensor_digest

__all__ = [
    "PREAMBLE_SIZE",
    "TRAILER",
    "CacheProvenance",
    "InvalidCacheFile",
    "SplitOutputs",
    "TeacherCache",
    "TeacherCacheError",
    "module_digest",
    "read_header",
]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TeacherCache(TeacherSource):
    """Precompute a teacher's outputs over a transfer set once; train without the teacher.

    Attach it to a :class:`~kd_lightning.data.TransferSetDataModule` or
    :class:`~kd_lightning.data.DatasetTransferSet` (``teacher_cache=``): the datamodule's
    ``prepare_data`` (one process per node) verifies the file or builds it, and ``setup`` (every
    process) opens it read-only; batches then carry ``teacher_logits`` (dense) or
    ``teacher_topk_values`` / ``teacher_topk_indices`` (``topk``). With any other data module
    call :meth:`ensure` with it at set-up and :meth:`lookup` per batch.

    Args:
        path: the cache file (its folder is created).
        teacher_checkpoint: ``.ckpt`` of the teacher (loaded with
            :class:`~kd_lightning.teachers.PretrainedTeacher` only when the cache is built); its
            SHA-256 is the teacher's identity. When the file is absent (a machine without the
            teacher) a valid cache is used as it is, and an invalid one is refused.
        teacher: the teacher as a module instead of a checkpoint (Python use); its identity is
            its :func:`~kd_lightning.digest.module_digest`.
        dtype: storage dtype of the values: ``float32``, ``float16`` or ``bfloat16``. Dense
            logits in float16 keep ~3 significant digits; float32 reproduces the live teacher.
        topk: store only the ``topk`` largest classes per sample (log-probabilities at
            ``temperature`` and class indices) instead of dense logits; use with
            :class:`~kd_lightning.losses.SparseSoftTargetKLLoss` at the same temperature.
        temperature: temperature of the stored top-k log-probabilities (top-k only). The
            loss must read them at this temperature (checked at start-up).
        selection: which k entries a sparse cache keeps: ``"topk"``, the k most probable (the
            rest's mass kept as one bucket); ``"sampled"``, k draws from the teacher at
            ``temperature`` stored as frequencies (Anshumann et al. 2025; unbiased for the
            forward KL, the only objective accepted with it; draws seeded by ``seed``).
        granularity: ``"sample"``: one output per sample, ``(B, C)`` logits; ``"token"``: one
            per token of a language model's ``(B, L, V)`` logits (needs ``topk``; data modules
            of right-padded token sequences, e.g. :class:`~kd_lightning.data.CausalLMTransferSet`).
        views: augmented views stored per training sample (K). Training sample ``i`` in epoch
            ``e`` replays view ``(e + h(i)) mod K``. Needs a datamodule with a random training
            augmentation when > 1.
        seed: seed of the views' augmentation parameters (``(seed, index, view)``).
        splits: splits to cache; caching ``val``/``test`` too lets validation run teacher-free.
            Splits a generic data module does not define are skipped.
        on_mismatch: ``rebuild`` (default) rebuilds a stale or corrupt file when the teacher is
            available; ``error`` always refuses it.
        batch_size: teacher batch size while building.
        device: device of the teacher while building (default: CUDA when available).
        progress: show a progress bar while building.
    """

    def __init__(
        self,
        path: str,
        teacher_checkpoint: str | None = None,
        teacher: nn.Module | None = None,
        dtype: str = "float16",
        topk: int | None = None,
        temperature: float = 4.0,
        selection: str = "topk",
        granularity: str = "sample",
        views: int = 1,
        seed: int = 0,
        splits: Sequence[str] = ("train", "val", "test"),
        on_mismatch: str = "rebuild",
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        temperature = check_settings(
            dtype, on_mismatch, topk, temperature, selection, granularity, views, seed, splits,
            batch_size,
        )  # fmt: skip
        if teacher_checkpoint is not None and teacher is not None:
            raise ValueError(
                "give the teacher either as teacher_checkpoint or as teacher, not both (to load a "
                "checkpoint into your own architecture pass teacher=PretrainedTeacher(path, model))"
            )
        refuse_aliased_inputs(path, teacher_checkpoint, teacher)  # before anything is read
        self.path = Path(path)
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher = teacher
        self.dtype = dtype
        self.topk = topk
        self.temperature = float(temperature)
        self.selection = selection
        self.granularity = granularity
        self.views = views
        self.seed = seed
        self.splits = tuple(dict.fromkeys(splits))
        self.on_mismatch = on_mismatch
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self._verified: tuple | None = None
        self._header: dict[str, Any] | None = None
        self._readers: dict[str, SplitOutputs | None] = {}

    def __repr__(self) -> str:
        kind = f"{self.selection}={self.topk}" if self.topk else "dense"
        return (
            f"TeacherCache({str(self.path)!r}, {kind}, per {self.granularity}, "
            f"dtype={self.dtype}, views={self.views})"
        )

    # ------------------------------------------------------------------ identity
    def expected_identity(self, source: Any) -> dict[str, Any]:
        """What a valid file's header must say for this run and data ``source``."""
        if cache_sources.is_tensor_source(source) and self.granularity == "token":
            raise TeacherCacheError(
                f"{type(source).__name__} holds tensors of samples; a per-token teacher cache "
                "reads data modules of token sequences (e.g. kd_lightning.data."
                "CausalLMTransferSet): use granularity: sample here"
            )
        if cache_sources.is_tensor_source(source):
            data = {}
            for split in self.splits:
                inputs, targets = source.raw_split(split)
                data[split] = {"fingerprint": tensor_digest(inputs, targets), "rows": len(targets)}
        else:
            data = cache_sources.fingerprints(cache_sources.split_datasets(source, self.splits))
        settings = getattr(source, "transform_settings", None)
        return {
            "teacher_digest": self.teacher_digest(),
            "data": data,
            "transform": settings() if settings is not None else {},
            "views": self.views,
            "seed": self.seed,
            "kind": "topk" if self.topk else "dense",
            "dtype": self.dtype,
            "topk": self.topk,
            "temperature": self.temperature if self.topk else None,
            "tail": TAILS[self.selection] if self.topk else None,
            "granularity": self.granularity,
            "num_classes": getattr(source, "num_classes", None),
        }

    @property
    def settings(self) -> tuple[str, int | None, float]:
        """``(dtype, topk, temperature)``: how outputs are stored."""
        return self.dtype, self.topk, self.temperature

    def views_of(self, split: str) -> int:
        return self.views if split == "train" else 1

    # ------------------------------------------------------------------ load / build
    def _stamp(self) -> tuple:
        stat = self.path.stat()
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def open(self) -> dict[str, Any]:
        """The file's header after checking its structure and payload (not what it was made from)."""
        header = read_header(self.path)
        stamp = self._stamp()
        if self._verified != stamp:  # the payload CRCs are checked once per process
            try:
                verify_payload(self.path, header)
            except ContainerError as error:
                raise InvalidCacheFile(self.path, error.reasons) from None
            self._verified = stamp
        if self._header != header:
            self._header, self._readers = header, {}
        return header

    def check(self, expected: dict[str, Any]) -> dict[str, Any]:
        """The file's header if the file is intact and made from ``expected``; else raise InvalidCacheFile."""
        reasons = compare_identity(read_header(self.path), expected)
        if reasons:
            raise InvalidCacheFile(self.path, reasons)
        return self.open()

    @property
    def provenance(self) -> CacheProvenance:
        """What the file was made from (teacher digests, kind, temperature, top-k, tail, ...).

        Raises:
            InvalidCacheFile: the file is missing or corrupt.
        """
        return CacheProvenance.from_header(self.path, self._header or self.open())

    def ensure(self, source: Any, *, may_build: bool = True, owner: Any = None) -> dict[str, Any]:
        """Return the header of a valid cache for ``source``, building it if needed and allowed.

        Args:
            source: a TransferSetDataModule, any LightningDataModule (set up), or a dict of
                DataLoaders / map-style datasets by split.
            may_build: whether this process may write the file.
            owner: the data module it serves (default ``source``): the method of its Trainer
                may refuse the settings before the teacher runs (``check_before_build``).

        Raises:
            TeacherCacheError: the file is unusable and cannot (or may not) be rebuilt, naming
                what mismatched and the fix; or the owner's method refuses its settings.
        """
        expected = self.expected_identity(source)
        try:
            return self.check(expected)
        except InvalidCacheFile as invalid:
            problem = invalid
        missing = not self.path.exists()
        what = "does not exist" if missing else "cannot be used: " + "; ".join(problem.reasons)
        if not missing and self.on_mismatch == "error":
            raise TeacherCacheError(
                f"teacher cache {self.path} {what}. on_mismatch='error' forbids rebuilding it: "
                "delete the file, point `path` elsewhere, or set on_mismatch: rebuild."
            ) from problem
        if not self.teacher_available():
            why = (
                f"the teacher checkpoint {self.teacher_checkpoint!r} does not exist"
                if self.teacher_checkpoint
                else "no teacher_checkpoint is set"
            )
            raise TeacherCacheError(
                f"teacher cache {self.path} {what}, and it cannot be rebuilt because {why}. "
                "Fix: set teacher_cache.teacher_checkpoint to the teacher's .ckpt (the cache is "
                "then rebuilt), or copy the cache that matches this data and teacher to "
                f"{self.path}."
            ) from problem
        if not may_build:
            raise TeacherCacheError(
                f"teacher cache {self.path} {what}. In a distributed run only prepare_data (rank "
                "0 of each node) builds the cache: call datamodule.prepare_data() before setup(), "
                "or let the Trainer do it."
            ) from problem
        check_before_build(source if owner is None else owner, self.path, expected)
        self.build(source, expected)
        return self.check(expected)

    def _load_teacher(self) -> nn.Module:
        from kd_lightning.teachers import FrozenTeacher, PretrainedTeacher

        if self.teacher is not None:
            teacher = self.teacher
            return teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        return PretrainedTeacher(self.teacher_checkpoint)

    def build(
        self,
        source: Any,
        expected: dict[str, Any] | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        """One pass of the teacher over every cached split and view, written atomically.

        Args:
            source: see :meth:`ensure`.
            expected: :meth:`expected_identity` if already computed.
            on_batch: called after every teacher batch (tests interrupt the build with it).
        """
        refuse_aliased_inputs(self.path, self.teacher_checkpoint, self.teacher)  # links may have
        refuse_replacing_other_files(self.path)  # changed since: checked again before writing
        expected = expected or self.expected_identity(source)
        if self.views > 1 and not getattr(source, "augments_train", False):
            raise ValueError(
                f"views={self.views} but {type(source).__name__} has no random training "
                "augmentation, so every view would be the same image: use views: 1"
            )
        teacher = self._load_teacher()
        device = torch.device(self.device) if self.device else _default_device()
        teacher = teacher.to(device)
        tensor_source = cache_sources.is_tensor_source(source)
        if tensor_source:
            batches = cache_sources.tensor_batches(
                source, self.splits, self.views, self.batch_size, device
            )
        else:
            datasets = cache_sources.split_datasets(source, self.splits)
            batches = cache_sources.dataset_batches(source, datasets, self.batch_size, device)
        total = sum(d["rows"] * self.views_of(s) for s, d in expected["data"].items())
        classes = expected["num_classes"]
        lengths = offsets = None
        if self.granularity == "token":  # the arrays' sizes: real tokens per sequence
            lengths = cache_sources.sequence_lengths(source, datasets, self.batch_size)
            offsets = {s: np.concatenate([[0], np.cumsum(n)]) for s, n in lengths.items()}
        first, draws = None, {}
        if self.selection == "sampled":  # k draws per row, from one seeded stream per split
            draws = sampled_selectors(self.topk, self.temperature, self.seed, device)
        with torch.inference_mode():
            if classes is None:  # a data module that does not say: the teacher's output does
                first = next(batches)
                classes = self._teacher_logits(teacher, first[1], device, None).shape[-1]
            arrays = array_layout(
                expected, classes, self.dtype, self.topk, self.views_of, not tensor_source, lengths
            )
            with (
                ContainerWriter(self.path, arrays, FORMAT, FORMAT_VERSION) as writer,
                tqdm(
                    total=total,
                    desc=f"Building teacher cache {self.path.name}",
                    unit="sample",
                    disable=not self.progress,
                ) as bar,
            ):
                for split, starts in (offsets or {}).items():
                    writer.write(f"{split}/offsets", torch.from_numpy(starts))
                for split, inputs, rows, view in cache_sources.chain(first, batches):
                    logits = self._teacher_logits(teacher, inputs, device, classes)
                    place = (view,) if offsets is None else offsets[split]
                    if offsets is not None:  # the real tokens of each sequence, in order
                        logits = logits[cache_sources.token_mask(inputs).to(logits.device)]
                    write_outputs(
                        writer, split, rows, place, logits, self.settings, draws.get(split)
                    )
                    if not tensor_source:
                        writer.array(f"{split}/keys")[rows.numpy()] = sample_keys(inputs)
                    bar.update(len(rows))
                    if on_batch is not None:
                        on_batch()
                writer.commit(
                    {
                        **expected,
                        "num_classes": classes,
                        "teacher_module_digest": module_digest(teacher),
                        "stored_values": stored_values(self.topk, self.temperature, self.selection),
                        "teacher_source": self.teacher_checkpoint
                        or f"{type(self.teacher).__module__}.{type(self.teacher).__qualname__}",
                        "datamodule": f"{type(source).__module__}.{type(source).__qualname__}",
                    }
                )
        self._verified, self._header, self._readers = None, None, {}

    def _teacher_logits(
        self, teacher: nn.Module, inputs: Any, device: torch.device, classes: int | None
    ) -> torch.Tensor:
        from kd_lightning.teachers import output_logits

        inputs = cache_sources.to_device(inputs, device)
        output = teacher(**inputs) if isinstance(inputs, Mapping) else teacher(inputs)
        logits = output_logits(output).float()
        if self.granularity == "sample" and logits.dim() != 2:
            raise TeacherCacheError(
                f"the teacher outputs logits of shape {tuple(logits.shape)}; this cache stores "
                "one output per sample, (B, C): for per-token (B, L, V) outputs of a language "
                "model set granularity: token (and topk)"
            )
        if self.granularity == "token" and logits.dim() != 3:
            raise TeacherCacheError(
                f"the teacher outputs logits of shape {tuple(logits.shape)}; a per-token cache "
                "needs (B, L, V) logits, one row per token: use granularity: sample"
            )
        if classes is not None and logits.shape[-1] != classes:
            raise TeacherCacheError(
                f"the teacher outputs {logits.shape[-1]} logits but the data has {classes} "
                "classes: use a teacher trained on this data set"
            )
        return logits

    # ------------------------------------------------------------------ reading
    def outputs(self, header: dict[str, Any], split: str) -> SplitOutputs | None:
        """Reader of one split's outputs (None when the split is not cached)."""
        specs = {
            name.split("/", 1)[1]: spec
            for name, spec in array_specs(header).items()
            if name.split("/", 1)[0] == split
        }
        return SplitOutputs(self.path, specs, header["dtype"]) if specs else None

    def lookup(self, batch: Any, split: str = "train") -> dict[str, torch.Tensor]:
        """The cached outputs of a batch of any data module, on the batch's device.

        Rows are found by ``index`` (and ``view``) when the batch has them, else by the content
        of each sample's input (see :func:`~kd_lightning.data.cache_format.sample_keys`).

        Args:
            batch: a batch (dict, ``(input, target)`` tuple, Hugging Face style dict).
            split: ``train``, ``val`` or ``test``.

        Raises:
            TeacherCacheError: the split is not cached, or a sample is not in the cache.
        """
        header = self._header or self.open()
        if split not in self._readers:
            self._readers[split] = self.outputs(header, split)
        reader = self._readers[split]
        if reader is None:
            raise TeacherCacheError(
                f"the teacher cache {self.path} has no {split!r} split (it holds "
                f"{sorted(header['data'])}): add {split!r} to teacher_cache.splits"
            )
        batch = normalise_batch(batch)
        length = cache_sources.token_mask(batch["input"]).shape[1] if reader.per_token else None
        if "index" in batch:
            index = batch["index"]
            views = batch.get("view")
            views = torch.zeros_like(index) if views is None else views
            found = reader.lookup(index, views, length)
        else:
            found = reader.lookup_inputs(batch["input"], length)
        device = cache_sources.batch_device(batch)
        return {k: v.to(device) for k, v in found.items()}
