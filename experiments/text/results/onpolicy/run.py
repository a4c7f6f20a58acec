"""The on-policy distillation table of docs/on_policy.md: run the rows, collect the figures.

Rows (configs in experiments/text/): the student alone, supervised token KD (JSD beta 0.5 on
the fixed blocks, lmbda 0), sequence-level KD (the teacher's greedy continuations), on-policy
GKD (lmbda 0.5, beta 0.5), each ``kd-lightning fit`` once per seed with one CPU thread; and the
teacher itself as a reference (validated in process on the same batches). Figures are those of
the last validation: perplexity of the real validation blocks, the teacher's per-token NLL of
the student's samples (64 tokens after 64-token prompts of the first 4 validation batches,
temperature 1), distinct-1/2 of those samples; plus the CPU seconds each run used.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python experiments/text/results/onpolicy/run.py \
        --seeds 0 [--rows onpolicy_gkd seqkd ...] [--teacher PATH] [--set KEY=VALUE ...]

``--teacher`` replaces the configs' teacher checkpoint, ``--set`` adds ``kd-lightning fit``
overrides (e.g. ``trainer.limit_train_batches=60``) to every row (``ROW:KEY=VALUE`` to one). Writes results.csv (one line
per run) and results.md (means over seeds) to ``--out`` (default: next to this file); rows
already in results.csv are kept (rerun a row by deleting its lines).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
ROWS = {
    "onpolicy_student_alone": "student alone",
    "onpolicy_supervised_kd": "supervised token KD (JSD 0.5, lmbda 0)",
    "seqkd": "sequence-level KD (greedy teacher outputs)",
    "onpolicy_gkd": "on-policy GKD (lmbda 0.5, JSD 0.5)",
}
FIELDS = ["run", "seed", "val_perplexity", "teacher_nll", "distinct_1", "distinct_2",
          "on_policy_fraction", "train_steps", "cpu_s"]  # fmt: skip
METRICS = {"val_perplexity": "val/perplexity", "teacher_nll": "val/teacher_nll",
           "distinct_1": "val/distinct_1", "distinct_2": "val/distinct_2",
           "on_policy_fraction": "train/on_policy"}  # fmt: skip


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key)]
    return f"{float(values[-1]):.4f}" if values else ""


def fit(name: str, seed: int, teacher: str | None, overrides: list[str], folder: str) -> dict:
    run = f"{folder}/{name}_s{seed}"
    before = _children_cpu()
    command = [sys.executable, "-m", "kd_lightning", "fit", "-c", f"experiments/text/{name}.yaml",
               "--seed_everything", str(seed), "--trainer.logger.init_args.name", run,
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if teacher:
        command += ["--model.init_args.teacher.init_args.checkpoint_path", teacher]
        if name == "seqkd":
            command += ["--data.init_args.generations.init_args.teacher_checkpoint", teacher]
    for override in overrides:
        key, _, value = override.partition("=")
        row, _, key = key.rpartition(":")  # "seqkd:data.init_args.train_blocks=32": one row
        if row in ("", name):
            command += [f"--{key}", value]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    metrics = sorted((ROOT / "runs/text" / run).glob("version_*/metrics.csv"))[-1]
    rows = list(csv.DictReader(metrics.open()))
    steps = max((int(r["step"]) for r in rows if r.get("step")), default=0) + 1
    result = {"run": name, "seed": seed, "train_steps": steps,
              "cpu_s": f"{_children_cpu() - before:.0f}"}  # fmt: skip
    result.update({field: _last(rows, key) for field, key in METRICS.items()})
    return result


def teacher_reference(seed: int, teacher: str | None, overrides: list[str]) -> dict:
    """The teacher as its own student: its perplexity and the NLL of its own samples."""
    import lightning as L
    import yaml

    from kd_lightning.data import CausalLMTransferSet
    from kd_lightning.methods import OnPolicyDistillation
    from kd_lightning.teachers import PretrainedTeacher, load_student

    config = yaml.safe_load((ROOT / "experiments/text/onpolicy_gkd.yaml").read_text())
    path = ROOT / (
        teacher or config["model"]["init_args"]["teacher"]["init_args"]["checkpoint_path"]
    )
    limit = config["trainer"]["limit_val_batches"]
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "trainer.limit_val_batches":
            limit = int(value)
    settings = {k: config["model"]["init_args"][k] for k in
                ("prompt_length", "max_new_tokens", "eval_generation_batches")}  # fmt: skip
    os.chdir(ROOT)
    before = resource.getrusage(resource.RUSAGE_SELF)
    method = OnPolicyDistillation(load_student(path), PretrainedTeacher(str(path)), lmbda=0.0,
                                  seed=seed, **settings)  # fmt: skip
    data = CausalLMTransferSet(**config["data"]["init_args"])
    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu",
                        limit_val_batches=limit)  # fmt: skip
    [metrics] = trainer.validate(method, datamodule=data)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result = {"run": "teacher", "seed": seed, "train_steps": "", "cpu_s": f"{cpu:.0f}"}
    result.update({f: f"{float(metrics[k]):.4f}" for f, k in METRICS.items() if k in metrics})
    return result


def _mean(rows: list[dict], field: str, digits: int) -> str:
    values = [float(r[field]) for r in rows if r.get(field) not in ("", None)]
    return f"{statistics.mean(values):.{digits}f}" if values else ""


def write(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(results)
    lines = ["| run | seeds | val perplexity | teacher NLL of samples | distinct-1 | distinct-2 | "
             "on-policy batches | CPU s per run |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, label in {"teacher": "teacher (reference)", **ROWS}.items():
        rows = [r for r in results if r["run"] == name]
        if not rows:
            continue
        cells = [_mean(rows, f, d) for f, d in (("val_perplexity", 2), ("teacher_nll", 3),
                 ("distinct_1", 3), ("distinct_2", 3), ("on_policy_fraction", 2), ("cpu_s", 0))]  # fmt: skip
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=["teacher", *ROWS])
    parser.add_argument("--teacher", help="teacher checkpoint instead of the configs' one")
    parser.add_argument("--set", nargs="*", default=[], help="fit overrides KEY=VALUE")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--runs", default="onpolicy_table", help="folder under runs/text")
    parser.add_argument("--merge", type=Path, nargs="*", help="only merge these results.csv")
    args = parser.parse_args()
    if args.merge:  # rows run as separate processes (in parallel), each with its own --out
        merged = [row for part in args.merge for row in csv.DictReader(part.open())]
        order = ["teacher", *ROWS]
        write(sorted(merged, key=lambda r: (order.index(r["run"]), int(r["seed"]))), args.out)
        return
    path = args.out / "results.csv"
    results = list(csv.DictReader(path.open())) if path.is_file() else []
    for seed in args.seeds:
        for name in args.rows:
            if any(r["run"] == name and int(r["seed"]) == seed for r in results):
                continue
            if name == "teacher":
                results.append(teacher_reference(seed, args.teacher, args.set))
            else:
                results.append(fit(name, seed, args.teacher, args.set, args.runs))
            write(results, args.out)


if __name__ == "__main__":
    main()
