r"""Sampling from causal language models for their distillation, and measures of the samples.

Pure torch (no Lightning): used by on-policy distillation (Agarwal et al. 2024, GKD; Gu et al.
2024, MiniLLM), where the student generates continuations of the transfer set's prompts inside
the training step, and by sequence-level KD (Kim & Rush 2016), where the teacher generates them
once (:mod:`kd_lightning.data.generated_targets`).

- :func:`prompt_lengths` / :func:`left_aligned_prompts`: the prompt of each row (its first
  ``prompt_length`` real tokens, or the tokens before its first label when prompts carry label
  ``-100``), moved to the right edge so every row continues at the same column.
- :func:`sample_continuations`: ``max_new_tokens`` tokens per row, each drawn from
  :math:`\mathrm{softmax}(z / T)` of the model's last logits (Gumbel-max with noise from a
  given ``torch.Generator``; ``temperature=0`` is greedy), always exactly ``max_new_tokens``
  steps: a row that produced the end-of-sequence token is padded and masked from then on, so
  no step waits for the host to ask whether every row has finished. Models that return a
  key/value cache (Hugging Face ``cache`` / ``past_key_values``) are fed one token per step.
- :func:`teacher_token_nll`: :math:`-\log p_{\text{teacher}}(y_t \mid y_{<t})` of every
  generated token.
- :func:`distinct_n`: distinct-n of Li et al. (2016), the number of distinct n-grams over the
  number of n-grams of a set of samples.
- :func:`derive_seed` / :func:`seeded_generator`: generators seeded from (seed, step, ...), so
  samples depend on where training stands and not on what ran before (exact resume).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import Metric

from kd_lightning.teachers.frozen import FrozenTeacher, output_logits

IGNORE_INDEX = -100
"""Label of a token no loss reads (prompt, padding, after the end of a sample)."""


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from ``keys`` (e.g. ``(seed, "train", step)``) by BLAKE2b: nearby keys give
    unrelated streams, unlike ``seed + step``."""
    digest = hashlib.blake2b(repr(tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(device: torch.device | str, *keys: int | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def _network(model: nn.Module) -> nn.Module:
    """The network behind wrappers that only hold it (frozen teacher, ``torch.compile``)."""
    if isinstance(model, FrozenTeacher):
        return _network(model.module)
    compiled = getattr(model, "_orig_mod", None)
    return _network(compiled) if isinstance(compiled, nn.Module) else model


def forward_arguments(model: nn.Module) -> set[str]:
    """Named arguments of the network's ``forward`` (``position_ids``, ``cache``, ...)."""
    try:
        parameters = inspect.signature(_network(model).forward).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model`` takes its key/value cache back, or None."""
    names = forward_arguments(model)
    if "use_cache" not in names:
        return None
    return next((n for n in ("cache", "past_key_values") if n in names), None)


def prompt_lengths(
    attention_mask: torch.Tensor,
    target: torch.Tensor | None = None,
    prompt_length: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Prompt length of each row ``(B,)``: its first ``prompt_length`` real tokens, or (``None``)
    its real tokens before the first labeled one (prompts labeled ``ignore_index``; a row with no
    label is all prompt). Right padding is assumed (real tokens first). No host sync."""
    real = attention_mask != 0
    length = real.sum(dim=1)
    if prompt_length is not None:
        return length.clamp(max=int(prompt_length))
    if target is None:
        raise ValueError(
            "without prompt_length the prompt is the tokens labeled -100 before the first "
            "label, but the batch has no target: set prompt_length (e.g. prompt_length: 32)"
        )
    labeled = (target != ignore_index) & real
    first = labeled.int().argmax(dim=1)
    return torch.where(labeled.any(dim=1), first, length)


def left_aligned_prompts(
    input_ids: torch.Tensor, lengths: torch.Tensor, width: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first ``lengths[b]`` tokens moved to the right edge of a ``(B, width)`` block.

    Returns ``(prompt_ids, prompt_mask)``: left padding with ``pad_token_id`` and mask 0, so that
    every row's next token goes to column ``width``. No host sync.
    """
    width = min(int(width), input_ids.shape[1])
    columns = torch.arange(width, device=input_ids.device).unsqueeze(0)
    offset = (width - lengths.clamp(max=width)).unsqueeze(1)
    source = (columns - offset).clamp_min(0)
    real = columns >= offset
    ids = torch.gather(input_ids[:, :width], 1, source)
    return torch.where(real, ids, pad_token_id), real.long()


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at the first real token (padding gets 0)."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)


def choose_tokens(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """One token per row from ``(B, V)`` logits: greedy at ``temperature=0``, else a sample of
    ``softmax(logits / T)`` by Gumbel-max (argmax of ``logits / T + G``, ``G = -log(-log U)``,
    ``U`` uniform from ``generator``). Entries at or beyond ``vocab_size`` are never chosen."""
    logits = logits.float()
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = logits[:, :vocab_size]
    if temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    tiny = torch.finfo(uniform.dtype).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
    return (logits / temperature + gumbel).argmax(dim=-1)


@dataclass
class Continuations:
    """Prompts with their generated continuations, as one causal-LM batch.

    Attributes:
        input_ids: ``(B, P + N)``: left-padded prompt, then the ``N`` generated tokens (padding
            after a row's end-of-sequence token).
        attention_mask: ``(B, P + N)``: 1 on the prompt's real tokens and the generated ones up
            to and including the end-of-sequence token.
        position_ids: ``(B, P + N)``: positions counted from each row's first real token.
        target: ``(B, P + N)``: the generated tokens; :data:`IGNORE_INDEX` on the prompt and on
            padding, so a token loss with ``shift=True`` reads exactly the generated tokens.
        prompt_width: ``P``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target: torch.Tensor
    prompt_width: int

    @property
    def generated(self) -> torch.Tensor:
        """``(B, N)`` generated tokens (padding after the end of a sample)."""
        return self.input_ids[:, self.prompt_width :]

    @property
    def generated_mask(self) -> torch.Tensor:
        """``(B, N)``: 1 where a token was generated (up to the end-of-sequence token)."""
        return self.attention_mask[:, self.prompt_width :]

    def model_input(self, with_positions: bool = True) -> dict[str, torch.Tensor]:
        """The ``model(**input)`` dict (``position_ids`` only for models that take them)."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if with_positions:
            inputs["position_ids"] = self.position_ids
        return inputs


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
    use_cache: bool = True,
) -> Continuations:
    """Generate ``max_new_tokens`` tokens after left-padded prompts (see :func:`left_aligned_prompts`).

    The model runs as it is (its mode, device, dtype and the caller's autocast); wrap the call
    in :func:`kd_lightning.modes.eval_mode` for generation without dropout. ``position_ids``
    are passed when the model's ``forward`` takes them (needed with left padding), the cache
    when it takes ``use_cache`` and returns one; otherwise the whole sequence is run each step.

    Args:
        model: a causal LM: ``model(input_ids=..., attention_mask=...)`` gives ``(B, L, V)`` logits.
        prompt_ids: ``(B, P)`` left-padded prompts.
        prompt_mask: ``(B, P)``, 0 on the left padding.
        max_new_tokens: tokens generated per row (every row gets exactly this many steps).
        temperature: sampling temperature; 0 is greedy decoding.
        generator: source of the sampling noise (on the model's device); see
            :func:`seeded_generator`.
        eos_token_id: a row ends after producing it (later tokens are padding, mask 0).
        pad_token_id: the padding token.
        vocab_size: sample only ids below it (a model whose output rows are padded).
        use_cache: feed one token per step with the model's key/value cache when it has one.

    Raises:
        ValueError: ``max_new_tokens < 1`` or a negative temperature.
    """
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    names = forward_arguments(model)
    with_positions = "position_ids" in names
    cache_name = cache_argument(model) if use_cache else None
    ids, mask = prompt_ids, prompt_mask.long()
    positions = positions_of(mask)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    cache = None
    for _ in range(int(max_new_tokens)):
        if cache is None:
            inputs = {"input_ids": ids, "attention_mask": mask}
            if with_positions:
                inputs["position_ids"] = positions
        else:
            inputs = {"input_ids": ids[:, -1:], "attention_mask": mask, cache_name: cache}
            if with_positions:
                inputs["position_ids"] = positions[:, -1:]
        if cache_name is not None:
            inputs["use_cache"] = True
        output = model(**inputs)
        if cache_name is not None:
            cache = _returned_cache(output)
        token = choose_tokens(output_logits(output)[:, -1], temperature, generator, vocab_size)
        live = ~finished
        token = torch.where(live, token, pad_token_id)
        if eos_token_id is not None:
            finished = finished | (live & (token == eos_token_id))
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, live.long().unsqueeze(1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    target = ids.masked_fill(mask == 0, IGNORE_INDEX)
    target[:, : prompt_ids.shape[1]] = IGNORE_INDEX
    return Continuations(ids, mask, positions, target, prompt_ids.shape[1])


def _returned_cache(output: object) -> object | None:
    for name in ("cache", "past_key_values"):
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def teacher_token_nll(
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The teacher's negative log-likelihood of each labeled token, next-token aligned.

    :math:`\ell_{b,t} = -\log \mathrm{softmax}(v_{b,t})[y_{b,t+1}]` for positions whose next
    label is not ``ignore_index`` (and, with a mask, whose own and next tokens are real);
    softmax in float32. The mean over samples is :math:`\sum \ell w / \sum w`.

    Args:
        teacher_logits: ``(B, L, V)``.
        target: ``(B, L)`` labels (the generated tokens; ``ignore_index`` elsewhere).
        attention_mask: ``(B, L)`` or None.

    Returns:
        ``(nll, weight)``, both ``(B, L - 1)``; ``weight`` is 1 where a token is scored, else 0
        (and ``nll`` is 0 there). No host sync.
    """
    keep = target[:, 1:] != ignore_index
    if attention_mask is not None:
        real = attention_mask != 0
        keep = keep & real[:, 1:] & real[:, :-1]
    log_p = torch.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    index = torch.where(keep, target[:, 1:], 0).unsqueeze(-1)
    nll = -torch.gather(log_p, -1, index).squeeze(-1)
    return torch.where(keep, nll, 0.0), keep.to(nll.dtype)


def sample_tokens(generated: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's generated tokens as a list (masked positions left out); moves to the host."""
    rows, keep = generated.detach().cpu().tolist(), (mask != 0).cpu().tolist()
    return [
        [t for t, k in zip(row, flags, strict=True) if k]
        for row, flags in zip(rows, keep, strict=True)
    ]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams, over a set of samples.

    n-grams are taken inside each sample (none spans two samples); repeats across samples count
    once among the distinct ones. ``nan`` when the samples hold no n-gram at all.

    Example: samples ``[[1, 2, 1, 2]]`` have bigrams (1,2), (2,1), (1,2): distinct-2 = 2/3.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    total, seen = 0, set()
    for sample in samples:
        grams = [tuple(sample[i : i + n]) for i in range(len(sample) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan


class DistinctNGrams(Metric):
    """Distinct-n (:func:`distinct_n`) of every sample seen since the last reset, for each n.

    ``update(generated, mask)`` with ``(B, N)`` tokens and mask; ``compute()`` returns
    ``{"distinct_<n>": value}``. Samples are gathered across processes before counting.

    Args:
        ns: the n-gram orders (default 1 and 2).
    """

    full_state_update = False

    def __init__(self, ns: Sequence[int] = (1, 2)) -> None:
        super().__init__()
        self.ns = tuple(int(n) for n in ns)
        self.add_state("tokens", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")

    def update(self, generated: torch.Tensor, mask: torch.Tensor) -> None:
        self.tokens.append(generated.detach())
        self.masks.append(mask.detach())

    def compute(self) -> dict[str, float]:
        tokens, masks = self.tokens, self.masks
        tokens = torch.cat(tokens) if isinstance(tokens, list) else tokens
        masks = torch.cat(masks) if isinstance(masks, list) else masks
        samples = sample_tokens(tokens, masks)
        return {f"distinct_{n}": distinct_n(samples, n) for n in self.ns}
