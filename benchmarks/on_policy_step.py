"""Step time of on-policy distillation (GKD) against a supervised token-KD step.

Measures, side by side in one run, alternating step by step (so machine load hits both alike),
one full training step (``training_step`` + backward + AdamW step) of
:class:`~kd_lightning.methods.OnPolicyDistillation` on the same batch of causal-LM blocks:

(a) supervised token KD: ``lmbda=0``: student forward/backward and teacher forward over the
    fixed block (generalized JSD, beta 0.5);
(b) on-policy: ``lmbda=1``: the student first samples ``max_new_tokens`` tokens after each
    block's first ``prompt_length`` tokens (key/value cache, no_grad, eval mode), then the
    same objective over the prompt + samples.

Defaults are the sizes of ``experiments/text/onpolicy_*.yaml`` (student GPT-2 2 x 128, teacher
4 x 264, vocabulary 4096, 16 blocks of 128 tokens, prompts of 64, 64 new tokens) with random
weights (time does not depend on them). Prints min / median / max per step and the ratio of
the medians, in CPU seconds of this process (``time.process_time``: with one thread, the
compute a step costs, little affected by other jobs on a shared machine) and in wall seconds.
A GKD run with ``lmbda`` spends about ``lmbda * (b) + (1 - lmbda) * (a)`` per step.

    python benchmarks/on_policy_step.py [--steps 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from kd_lightning.methods import OnPolicyDistillation
from kd_lightning.models import HFModel


def gpt2(layers: int, width: int, heads: int, vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = dict(n_layer=layers, n_embd=width, n_head=heads, n_positions=128,
                  bos_token_id=5, eos_token_id=5, pad_token_id=0)  # fmt: skip
    return HFModel(model_type="gpt2", task="causal-lm", config=config, num_classes=vocab)


def method(
    args: argparse.Namespace, lmbda: float
) -> tuple[OnPolicyDistillation, torch.optim.Optimizer]:
    student = gpt2(2, 128, 2, args.vocab, seed=0)
    teacher = gpt2(4, 264, 4, args.vocab, seed=1)
    module = OnPolicyDistillation(
        student, teacher, lmbda=lmbda, prompt_length=args.prompt_length,
        max_new_tokens=args.max_new_tokens, num_classes=args.vocab, seed=0,
    )  # fmt: skip
    module.train()
    return module, torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)


def step(
    module: OnPolicyDistillation, optimizer: torch.optim.Optimizer, batch: dict
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one training step."""
    cpu, wall = time.process_time(), time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    optimizer.step()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, default=6, help="timed steps of each (after 1 warm-up)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.trainer.*")
    ids = torch.randint(6, args.vocab, (args.batch, args.block),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    batch = {"input": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "target": ids}
    runs = {"supervised": method(args, 0.0), "on_policy": method(args, 1.0)}
    for module, _ in runs.values():
        module.check_example(batch)
    times: dict[tuple[str, str], list[float]] = {
        (name, clock): [] for name in runs for clock in ("cpu", "wall")
    }
    for i in range(args.steps + 1):
        for name, (module, optimizer) in runs.items():
            cpu, wall = step(module, optimizer, batch)
            if i > 0:  # the first step of each is a warm-up
                times[name, "cpu"].append(cpu)
                times[name, "wall"].append(wall)
    print(f"threads={args.threads} batch={args.batch} block={args.block} vocab={args.vocab} "
          f"prompt={args.prompt_length} new={args.max_new_tokens} steps={args.steps}")  # fmt: skip
    print(f"{'step':<12}{'clock':<6}{'min s':>8}{'median s':>10}{'max s':>8}")
    for (name, clock), values in times.items():
        low, mid, high = min(values), statistics.median(values), max(values)
        print(f"{name:<12}{clock:<6}{low:>8.3f}{mid:>10.3f}{high:>8.3f}")
    for clock in ("cpu", "wall"):
        ratio = statistics.median(times["on_policy", clock]) / statistics.median(
            times["supervised", clock]
        )
        print(f"on_policy / supervised ({clock} medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
