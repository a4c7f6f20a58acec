"""Write the notebooks (``python notebooks/_build.py``); CI executes them with ``pytest --nbmake``.

The notebooks are generated so their code is reviewed as code. Each one runs in fast mode by
default (a few epochs, one or two seeds: what CI runs); ``KD_FAST=0`` in the environment runs
the full-length version.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the cells of each notebook
from _prototype import cells as prototype_cells  # noqa: E402

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
import sys
import tempfile
from pathlib import Path

import torch

# FAST: a few epochs and seeds, so the notebook runs in CI in seconds. KD_FAST=0 runs it in full.
FAST = os.environ.get("KD_FAST", "1") != "0"
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
if str(ROOT) not in sys.path:  # the repository's kd_lightning, installed or not
    sys.path.insert(0, str(ROOT))
OUT = Path(tempfile.mkdtemp(prefix="kd-notebook-")) if FAST else ROOT / "results" / "notebooks"
torch.set_num_threads(1)  # tiny models: one thread per process is fastest on a small CPU
print(f"FAST={FAST}, writing to {OUT}")"""


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(
        cells=[new_markdown_cell(s) if kind == "md" else new_code_cell(s) for kind, s in cells]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


QUICKSTART = [
    (
        "md",
        """\
# 01 · Quickstart: distil a teacher into a small student on digits

The digits data set ships with scikit-learn (1797 8x8 images), so this runs offline on a CPU.
We train a **teacher** (a small CNN, 66K parameters), a **student alone** (an MLP with 2.4K
parameters) and the same student **distilled** from the teacher (Hinton et al. 2015: soft
targets at T=4) — with only 10% of the labels, where distillation shines: the teacher labels
the other 90% softly.

Everything below is one call to the study runner, the same as
`kd-lightning study experiments/digits/study_core.yaml` on the command line.""",
    ),
    ("code", SETUP),
    (
        "md",
        "## The study file\n\nA study lists runs (configs + overrides) and seeds; `needs` "
        "hands the teacher's checkpoint to the students, so the teacher trains first.",
    ),
    ("code", 'print((ROOT / "experiments/digits/study_core.yaml").read_text())'),
    (
        "md",
        "## Run it\n\nIn fast mode: one seed, 4 epochs, and only the 10%-label rows (plus the "
        "teacher they need). Rerunning the cell skips what is done.",
    ),
    (
        "code",
        """\
from kd_lightning.bench import run_study

results = run_study(
    ROOT / "experiments/digits/study_core.yaml",
    seeds=[0] if FAST else None,
    only=["student_alone@10%", "hinton_kd@10%"],
    overrides={"trainer.max_epochs": 4} if FAST else None,
    output_dir=OUT / "quickstart",
)""",
    ),
    (
        "md",
        "## Look at the results\n\nThe table has the last-epoch test accuracy (no selection) "
        "and the accuracy of the epoch with the best validation accuracy, the delta to the student "
        "alone, agreement with the teacher, size and CPU latency.",
    ),
    (
        "code",
        """\
from IPython.display import Image, Markdown, display

display(Markdown(results.paths["markdown"].read_text()))
display(Image(filename=str(results.paths["png"])))""",
    ),
    (
        "code",
        """\
rows = {row["run"]: row for row in results.rows}
teacher, alone, kd = rows["teacher"], rows["student_alone@10%"], rows["hinton_kd@10%"]
print(f"teacher {teacher['acc_last_mean']:.1f}%  alone {alone['acc_last_mean']:.1f}%  "
      f"distilled {kd['acc_last_mean']:.1f}% (delta {kd['delta_last']:+.1f})")
assert teacher["acc_last_mean"] > 90, "the teacher should learn digits"
assert kd["delta_last"] > 0, "with 10% labels the distilled student should beat the student alone"
assert kd["agreement_mean"] > alone["agreement_mean"], "distillation makes the student agree more with its teacher"
assert kd["params"] == alone["params"] < teacher["params"] / 10""",
    ),
    (
        "md",
        "## Use the distilled student\n\nA checkpoint of any method holds the student only; "
        "`load_student` rebuilds it for inference.",
    ),
    (
        "code",
        """\
import matplotlib.pyplot as plt

from kd_lightning import load_student
from kd_lightning.data import DigitsTransferSet

run = next(r for r in results if r["run"] == "hinton_kd@10%")
student = load_student(run["checkpoint"])
test = DigitsTransferSet().dataset("test")
with torch.no_grad():
    predicted = student(test.inputs[:10]).argmax(-1)
fig, axes = plt.subplots(1, 10, figsize=(10, 1.6))
for ax, image, label, guess in zip(axes, test.inputs[:10], test.targets[:10], predicted, strict=True):
    ax.imshow(image[0], cmap="gray_r")
    ax.set_title(f"{guess.item()}" + ("" if guess == label else f" ({label.item()})"), fontsize=9)
    ax.axis("off")
plt.show()
assert (predicted == test.targets[:10]).float().mean() >= 0.7""",
    ),
]

PROTOTYPE = prototype_cells(SETUP)

READ = [
    (
        "md",
        """\
# 03 · Read a study: the CSV table, per-epoch logs and the W&B export

A study leaves everything on disk: `results.csv` (the table), one folder per run and seed
with `result.json`, `config.yaml` and `logs/metrics.csv`, and — with W&B on — one W&B run per
(run, seed) in a shared group. Here we run a tiny study with W&B **offline** (no account, no
network), then read it all back, plot it and compare methods seed by seed.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ[key] = str(OUT / key.lower())
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")""",
    ),
    (
        "code",
        """\
from kd_lightning.bench import run_study

results = run_study(
    ROOT / "experiments/digits/study_core.yaml",
    seeds=[0, 1] if FAST else None,
    only=["student_alone@10%", "hinton_kd@10%"],
    overrides={"trainer.max_epochs": 4} if FAST else None,
    output_dir=OUT / "study",
    wandb={"project": "kd-notebook", "mode": "offline"},
    echo=False,
)
print(results.paths["csv"])  # a quick check (fast mode) writes under quick-checks/""",
    ),
    ("md", "## The table, from `results.csv`"),
    (
        "code",
        """\
from kd_lightning.bench import read_csv

table = read_csv(results.paths["csv"])
columns = ["run", "acc_last_mean", "acc_last_std", "acc_best_val_mean", "delta_last", "agreement_mean", "params"]
for row in table:
    print("  ".join(f"{row[c]!s:>18}" for c in columns))
assert [row["run"] for row in table] == ["teacher", "student_alone@10%", "hinton_kd@10%"]
assert table[2]["seeds"] == (2 if FAST else 3)""",
    ),
    (
        "code",
        """\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.5))
names = [row["run"] for row in table]
ax.barh(names, [row["acc_last_mean"] for row in table], xerr=[row["acc_last_std"] for row in table],
        label="last epoch", alpha=0.8)
ax.scatter([row["acc_best_val_mean"] for row in table], names, color="k", marker="|", s=200,
           label="best-val epoch", zorder=3)
ax.set_xlabel("test accuracy %")
ax.legend(loc="lower left")
plt.show()""",
    ),
    ("md", "## Learning curves, from each run's `metrics.csv`"),
    (
        "code",
        """\
curves = {}
for result in results:
    if result["seed"] != 0:
        continue
    metrics = read_csv(Path(result["checkpoint"]).parent / "logs" / "metrics.csv")
    curves[result["run"]] = [row["val/acc"] for row in metrics if row.get("val/acc") is not None]
for name, curve in curves.items():
    plt.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o", label=name)
plt.xlabel("epoch")
plt.ylabel("val accuracy %")
plt.legend()
plt.show()
best = {r["run"]: r for r in results if r["seed"] == 0}
for name, curve in curves.items():  # the best-val column comes from the best epoch of this curve
    assert best[name]["best_epoch"] == curve.index(max(curve)) + 1""",
    ),
    (
        "md",
        "## The W&B export\n\nOffline runs sit in `<output_dir>/wandb/`; "
        "`read_offline_runs` reads them without a server: config, history, summary, group, job type.",
    ),
    (
        "code",
        """\
from kd_lightning.bench import read_offline_runs
from kd_lightning.bench.wandb_offline import read_table

runs = read_offline_runs(results.output_dir / "wandb")
for run in runs:
    print(f"{run.name:24} group={run.group} job={run.job_type:8} history rows={len(run.history)}")
assert len({run.group for run in runs}) == 1  # one study, one group
assert {run.job_type for run in runs} == {"teacher", "baseline", "distill", "summary"}

kd = next(run for run in runs if run.name == "hinton_kd@10%-seed0")
assert {"train/loss_kd_epoch", "train/loss_ce_epoch", "val/acc"} <= kd.metric_keys
assert kd.config["model"]["init_args"]["loss_terms"][0]["init_args"]["name"] == "kd"
wandb_curve = [row["val/acc"] for row in kd.history if "val/acc" in row]
csv_curve = curves["hinton_kd@10%"]
assert len(wandb_curve) == len(csv_curve)  # W&B and CSV logged the same values
assert all(abs(a - b) < 1e-6 for a, b in zip(wandb_curve, csv_curve, strict=True))
summary = next(run for run in runs if run.job_type == "summary")
assert [row["run"] for row in read_table(summary, "study/results")] == [row["run"] for row in table]""",
    ),
    (
        "md",
        "## Compare two methods seed by seed\n\nEvery seed shares its teacher and data split "
        "between the runs, so the per-seed difference is a paired comparison.",
    ),
    (
        "code",
        '''\
by_seed = {}
for result in results:
    by_seed.setdefault(result["seed"], {})[result["run"]] = 100 * result["test_acc"]
differences = [runs_["hinton_kd@10%"] - runs_["student_alone@10%"] for runs_ in by_seed.values()]
print("KD - alone, per seed:", [f"{d:+.2f}" for d in differences])
mean_difference = sum(differences) / len(differences)
row = next(r for r in table if r["run"] == "hinton_kd@10%")
assert abs(mean_difference - row["delta_last"]) < 0.02  # the table's delta is the mean paired difference
assert all(d > 0 for d in differences), "KD beats the student alone on every seed"''',
    ),
]


def main() -> None:
    for name, cells in [
        ("01_quickstart.ipynb", QUICKSTART),
        ("02_prototype_a_loss.ipynb", PROTOTYPE),
        ("03_read_a_study.ipynb", READ),
    ]:
        nbformat.write(notebook(cells), HERE / name)
        print(HERE / name)
    # The notebooks' code follows the project's style too (ruff formats .ipynb cells).
    subprocess.run([sys.executable, "-m", "ruff", "format", "--quiet", str(HERE)], check=False)


if __name__ == "__main__":
    main()
