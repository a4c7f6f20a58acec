"""Peak memory and step time of token-level KD: naive vs chunked vs fused-linear, side by side.

One training step of the loss between a student and a teacher output layer over N tokens:
student hidden states ``(N, H)`` and output weight ``(V, H)`` (both trained), teacher hidden
states and weight (frozen), forward KL at T=1 (``--objective`` to change), 1 token in 10
ignored. Three variants:

- ``naive``: full student logits ``(N, V)`` and teacher logits, then
  ``kd_lightning.functional.token_divergence``, then backward;
- ``chunked``: the same logits, then ``chunked_token_divergence`` (probabilities chunk by chunk,
  recomputed in backward);
- ``fused``: ``fused_linear_token_divergence`` from the hidden states and weights of both
  models (neither model's full logits ever exist).

Each variant runs in its own subprocess. Peak memory: on CPU the child's peak RSS
(``resource.getrusage``) minus that of a baseline child that builds the same inputs and runs no
step; on a GPU ``torch.cuda.max_memory_allocated`` over the steps minus the memory allocated
before them. Step time (forward + backward): the median of ``--repeats`` steps after
``--warmup`` steps (with ``--rounds`` > 1, the median over that many alternating subprocesses). Ratios are to the naive variant of the same vocabulary, measured in the same
run.

    python benchmarks/token_kd_memory.py                      # 4096 tokens, H 1024, V 32k and 128k
    python benchmarks/token_kd_memory.py --tokens 1024 --vocab 128000 --repeats 3

On a CPU the naive step at 4096 tokens and 128k vocabulary needs about 14 GiB; the script refuses
sizes whose naive step would not fit in ``--memory-fraction`` (default 70%) of the available
memory (shrink ``--tokens``, or raise the fraction on an otherwise idle machine).

Measured results (2-core CPU): ``benchmarks/README.md``. At 4096 tokens, H 1024, V 128k the fused
form used 0.049x the naive form's peak memory (684 vs 14026 MiB) at 0.68x its step time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "fused")
# Full-size float32 (N, V) buffers alive at the naive step's peak (measured: 6.8 at 2048 x 128k).
NAIVE_BUFFERS = 7


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument(
        "--objective",
        default="forward_kl",
        choices=("forward_kl", "reverse_kl", "jsd", "total_variation"),
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=1, help="subprocesses per variant, run alternately"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.7,
        help="refuse sizes whose naive step needs more than this fraction of the available memory",
    )
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--child", choices=("baseline", *VARIANTS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def child(args) -> dict:
    """Build the inputs, run the variant's steps, report peak memory (bytes) and step times."""
    try:  # If memory runs out, the kernel should end this benchmark, not a neighbour's process.
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("1000")
    except OSError:
        pass
    import torch
    import torch.nn.functional as F

    from kd_lightning.functional import (
        chunked_token_divergence,
        fused_linear_token_divergence,
        token_divergence,
    )

    device = torch.device(args.device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    vocab, hidden_size, tokens = args.vocab[0], args.hidden, args.tokens

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    hidden = make(tokens, hidden_size).requires_grad_(True)
    weight = make(vocab, hidden_size, scale=hidden_size**-0.5).requires_grad_(True)
    teacher_hidden = make(tokens, hidden_size)
    teacher_weight = make(vocab, hidden_size, scale=2 * hidden_size**-0.5)
    target = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    target[::10] = -100
    options = dict(objective=args.objective, shift=False)

    def step(variant, hidden, weight, teacher_hidden, teacher_weight, target):
        hidden.grad = weight.grad = None
        if variant == "fused":
            loss = fused_linear_token_divergence(
                hidden,
                weight,
                teacher_hidden,
                target,
                teacher_weight=teacher_weight,
                chunk_size=args.chunk_size,
                **options,
            )
        else:
            logits = F.linear(hidden, weight)
            with torch.no_grad():
                teacher = F.linear(teacher_hidden, teacher_weight)
            if variant == "naive":
                loss = token_divergence(logits, teacher, target, **options)
            else:
                loss = chunked_token_divergence(
                    logits, teacher, target, chunk_size=args.chunk_size, **options
                )
        loss.backward()
        return loss

    # Every child (the baseline too) first runs all variants on tiny inputs, so that library
    # start-up memory (thread pools, matmul scratch space) is in the baseline, not in a variant.
    tiny = (make(8, 16).requires_grad_(True), make(32, 16).requires_grad_(True), make(8, 16))
    for variant in VARIANTS:
        step(variant, *tiny, make(32, 16), torch.zeros(8, dtype=torch.long, device=device))
    inputs = (hidden, weight, teacher_hidden, teacher_weight, target)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times, loss = [], float("nan")
    if args.child != "baseline":
        for index in range(args.warmup + args.repeats):
            synchronize()
            start = time.perf_counter()
            loss = step(args.child, *inputs).item()
            synchronize()
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(peak=peak, median=statistics.median(times) if times else 0.0, loss=loss)


def run_child(args, vocab: int, variant: str) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        variant,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(vocab),
        "--objective",
        args.objective,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
    ]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    # A fixed mmap threshold: glibc otherwise raises it after each large free, so later buffers
    # of a few MiB come from a heap that never shrinks, and RSS would count freed chunks.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} at vocab {vocab} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.device == "cpu":
        largest = max(args.vocab) * args.tokens * 4 * NAIVE_BUFFERS
        if largest > args.memory_fraction * available_bytes():
            raise SystemExit(
                f"The naive step at {args.tokens} tokens x vocab {max(args.vocab)} needs about "
                f"{largest / 2**30:.1f} GiB, more than {args.memory_fraction:.0%} of the available "
                f"memory ({available_bytes() / 2**30:.1f} GiB). Pass a smaller --tokens, or a "
                "larger --memory-fraction on a machine with nothing else running."
            )
    print(
        f"token KD step: {args.tokens} tokens, hidden {args.hidden}, objective {args.objective}, "
        f"device {args.device}, float32, median of {args.repeats} steps after {args.warmup} warm-up"
    )
    header = f"{'vocab':>7} | {'variant':<8} | {'peak MiB':>9} | {'x naive':>7} | {'step s':>7} | {'x naive':>7} | loss"
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        runs = {variant: [] for variant in ("baseline", *VARIANTS)}
        # Rounds alternate the variants, so that changing machine load hits all of them alike.
        for _ in range(args.rounds):
            for variant in runs:
                if variant != "baseline" or args.device == "cpu":
                    runs[variant].append(run_child(args, vocab, variant))
        baseline = statistics.median(r["peak"] for r in runs["baseline"]) if runs["baseline"] else 0
        results = {
            variant: dict(
                peak=statistics.median(r["peak"] for r in runs[variant]),
                median=statistics.median(r["median"] for r in runs[variant]),
                loss=runs[variant][0]["loss"],
            )
            for variant in VARIANTS
        }
        naive = results["naive"]
        naive_peak = max(naive["peak"] - baseline, 1)
        for variant, result in results.items():
            peak = result["peak"] - baseline
            print(
                f"{vocab:>7} | {variant:<8} | {peak / 2**20:>9.0f} | {peak / naive_peak:>7.3f} | "
                f"{result['median']:>7.3f} | {result['median'] / naive['median']:>7.2f} | "
                f"{result['loss']:.6f}"
            )


if __name__ == "__main__":
    main()
