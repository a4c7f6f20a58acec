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

PROTOTYPE = [
    (
        "md",
        """\
# 02 · Prototype a new distillation loss in a notebook

A loss is a plain `torch.nn.Module` with the contract `forward(*, student, teacher,
target=None) -> scalar`. Here we write one that is not in the library — the **Jensen-Shannon
divergence** between the softened student and teacher distributions (symmetric and bounded,
unlike Hinton's KL) — plug it into `OfflineDistillation` through a `LossTerm`, and compare it
with KD in a small study. Nothing in the library is edited.""",
    ),
    ("code", SETUP),
    ("md", "## The loss (about 20 lines)"),
    (
        "code",
        '''\
import torch.nn.functional as F
from torch import nn


class SoftTargetJSLoss(nn.Module):
    """Jensen-Shannon divergence of softened student and teacher outputs, times T^2.

    JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2 and p, q the softmax at
    temperature T; bounded by log 2, symmetric. Softmax in float32; the teacher is detached.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, *, student, teacher, target=None):
        t = self.temperature
        log_p = F.log_softmax(student.float() / t, dim=-1)
        log_q = F.log_softmax(teacher.detach().float() / t, dim=-1)
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        return 0.5 * (kl_pm + kl_qm).mean() * t * t''',
    ),
    (
        "md",
        "## Check it against what the equation says\n\nZero for identical inputs, symmetric, "
        "bounded by `log 2 · T²`, equal to a hand computation, and a gradient for the student only.",
    ),
    (
        "code",
        """\
import math

torch.manual_seed(0)
loss = SoftTargetJSLoss(temperature=2.0)
s, t = torch.randn(16, 10, requires_grad=True), torch.randn(16, 10, requires_grad=True)
assert loss(student=t, teacher=t).abs() < 1e-6
assert torch.allclose(loss(student=s, teacher=t), loss(student=t, teacher=s), atol=1e-6)
assert loss(student=100 * s, teacher=-100 * s) <= math.log(2) * 4 + 1e-5

p, q = torch.softmax(s / 2, -1), torch.softmax(t / 2, -1)
m = (p + q) / 2
by_hand = 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1)).mean() * 4
assert torch.allclose(loss(student=s, teacher=t), by_hand, atol=1e-5)

loss(student=s, teacher=t).backward()
assert s.grad.abs().sum() > 0 and t.grad is None  # the teacher is never trained
print("the loss behaves as its equation says")""",
    ),
    (
        "md",
        """\
## Compare it with KD in a small study

The study takes runs built in Python: the digits configs with overrides. The new loss goes
into the KD term's place by its class path, `__main__.SoftTargetJSLoss` (classes defined in a
notebook live in `__main__`); the CE term stays. All students see 10% of the labels.""",
    ),
    (
        "code",
        """\
from kd_lightning.bench import Study, run_study

needs = {"model.init_args.teacher.init_args.checkpoint_path": "teacher"}
ten_percent = {"data.init_args.labeled_fraction": 0.1}
js_term = {
    "model.init_args.loss_terms.0.init_args.name": "js",
    "model.init_args.loss_terms.0.init_args.loss": {
        "class_path": "__main__.SoftTargetJSLoss",
        "init_args": {"temperature": 4.0},
    },
}
study = Study.from_dict(
    {
        "name": "prototype-js",
        "seeds": [0] if FAST else [0, 1, 2],
        "output_dir": str(OUT / "prototype"),
        "reference_teacher": "teacher",
        "baseline": "student_alone@10%",
        "runs": [
            {"name": "teacher", "config": "teacher.yaml", "baseline": None},
            {"name": "student_alone@10%", "config": "student_alone.yaml", "overrides": ten_percent},
            {"name": "hinton_kd@10%", "config": "hinton_kd.yaml", "overrides": ten_percent, "needs": needs},
            {"name": "js_kd@10%", "config": "hinton_kd.yaml", "overrides": {**ten_percent, **js_term}, "needs": needs},
        ],
    },
    base_dir=ROOT / "experiments/digits",
)
results = run_study(study, overrides={"trainer.max_epochs": 4} if FAST else None)""",
    ),
    (
        "code",
        """\
from IPython.display import Image, Markdown, display

display(Markdown(results.paths["markdown"].read_text()))
display(Image(filename=str(results.paths["png"])))""",
    ),
    (
        "md",
        "## What the run logged\n\nEvery loss term is logged under its name: `train/loss_js` "
        "for the new one.",
    ),
    (
        "code",
        """\
import csv

js_run = next(r for r in results if r["run"] == "js_kd@10%")
metrics_file = Path(js_run["checkpoint"]).parent / "logs" / "metrics.csv"
with metrics_file.open() as f:
    epochs = [row for row in csv.DictReader(f) if row.get("train/loss_js_epoch")]
js_curve = [float(row["train/loss_js_epoch"]) for row in epochs]
print("train/loss_js per epoch:", [round(v, 4) for v in js_curve])

rows = {row["run"]: row for row in results.rows}
assert "js_kd@10%" in rows, "the prototyped loss has its row in the table"
assert js_curve[-1] < js_curve[0], "the student moves towards the teacher under the new loss"
assert rows["js_kd@10%"]["delta_last"] > 0, "JS distillation beats the student alone at 10% labels"
print(f"JS {rows['js_kd@10%']['acc_last_mean']:.1f}% vs KD {rows['hinton_kd@10%']['acc_last_mean']:.1f}% "
      f"vs alone {rows['student_alone@10%']['acc_last_mean']:.1f}%")""",
    ),
    (
        "md",
        "## The same in plain Python\n\nOutside a study, the loss goes straight into "
        "`OfflineDistillation` with a `LossTerm` and trains with any Lightning `Trainer`.",
    ),
    (
        "code",
        """\
import lightning as L

from kd_lightning import LossTerm, OfflineDistillation, PretrainedTeacher
from kd_lightning.data import DigitsTransferSet
from kd_lightning.losses import HardLabelCrossEntropy
from kd_lightning.models import MLP

teacher_checkpoint = next(r for r in results if r["run"] == "teacher")["checkpoint"]
method = OfflineDistillation(
    student=MLP(num_classes=10, hidden_sizes=[32]),
    teacher=PretrainedTeacher(teacher_checkpoint),
    loss_terms=[
        LossTerm(SoftTargetJSLoss(temperature=4.0), weight=0.9, name="js"),
        LossTerm(HardLabelCrossEntropy(), weight=0.1, name="ce"),
    ],
)
trainer = L.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(method, DigitsTransferSet(labeled_fraction=0.1))
assert {"train/loss_js_epoch", "train/loss_ce_epoch", "val/agreement"} <= set(trainer.callback_metrics)""",
    ),
]

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
print(sorted(p.name for p in (OUT / "study").iterdir()))""",
    ),
    ("md", "## The table, from `results.csv`"),
    (
        "code",
        """\
from kd_lightning.bench import read_csv

table = read_csv(OUT / "study" / "results.csv")
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

runs = read_offline_runs(OUT / "study" / "wandb")
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
