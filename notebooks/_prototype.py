"""Notebook 02: prototype a new loss and a new method variant, with no library edit.

Its cells, kept apart from ``_build.py`` (which writes every notebook) to keep files short.
"""

from __future__ import annotations


def cells(setup: str) -> list[tuple[str, str]]:
    """The cells of ``02_prototype_a_loss.ipynb``; ``setup`` is the shared first code cell."""
    return [(kind, setup if text is None else text) for kind, text in _CELLS]


_CELLS: list[tuple[str, str | None]] = [
    (
        "md",
        """\
# 02 · Prototype a new loss and a new method in a notebook

A loss is a plain `torch.nn.Module` with the contract `forward(*, student, teacher,
target=None) -> scalar`; a method is a subclass of a library method that changes only what
differs. Here we write both, with nothing in the library edited:

1. a **loss**: the **Jensen-Shannon divergence** between the softened student and teacher
   distributions (symmetric and bounded, unlike Hinton's KL), 15 lines;
2. a **method**: **curriculum temperature KD** (CTKD, Li et al. 2023), Hinton's KD whose
   temperature is a parameter learned *against* the student, 39 lines (its loss 18, the
   method class 19).

Both are checked against their equations, then compared with KD in a small study.""",
    ),
    ("code", None),  # the shared setup cell
    ("md", "## The loss (15 lines)"),
    (
        "code",
        '''\
import math

import torch.nn.functional as F
from torch import nn


class SoftTargetJSLoss(nn.Module):
    """T^2 JS(p_s, p_t) = T^2 [KL(p_s||m) + KL(p_t||m)] / 2, m = (p_s + p_t) / 2, p = softmax(z/T).
    (B, C) logits -> scalar, batch mean; bounded by T^2 log 2 (Lin 1991); teacher detached."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, *, student, teacher, target=None):
        t = self.temperature
        log_p = F.log_softmax(student.float() / t, dim=-1)
        log_q = F.log_softmax(teacher.detach().float() / t, dim=-1)
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
        js = (log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m)).sum(-1) / 2
        return js.mean() * t * t''',
    ),
    (
        "md",
        "## Check it against what the equation says\n\nZero for identical inputs, symmetric, "
        "bounded by `log 2 · T²`, equal to a hand computation, and a gradient for the student only.",
    ),
    (
        "code",
        """\
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
## The method (39 lines)

CTKD learns the temperature `T = T_min + (T_max - T_min) · sigmoid(θ)` adversarially: the
student minimises `α T² KL(p_t^T ‖ p_s^T) + (1 - α) CE`, while θ *maximises* the KL term through
a gradient reversal whose strength λ rises from 0 to 1 over `curriculum_epochs` with a cosine,
`λ = (1 - cos(π · min(1, epoch / E))) / 2`: the distillation task gets harder as the student
learns. The temperature is a part of the loss (an `nn.Parameter`, so the method's optimizer
trains it); the method subclasses `OfflineDistillation`, sets its objective and logs the
temperature as knowledge (`log.temperature` becomes `train/temperature`).""",
    ),
    (
        "code",
        '''\
from lightning.pytorch.cli import OptimizerCallable

from kd_lightning import LossTerm, OfflineDistillation
from kd_lightning.losses import HardLabelCrossEntropy
from kd_lightning.methods.base import default_optimizer


class LearnableTemperatureKL(nn.Module):
    """T^2 KL(p_t || p_s), p = softmax(z / T), T = lo + (hi - lo) sigmoid(theta). theta's gradient
    is reversed and scaled by lambda = (1 - cos(pi min(1, epoch / E))) / 2 (CTKD, Li et al. 2023).
    (B, C) logits -> scalar, batch mean; the teacher is detached."""

    def __init__(self, t_init=4.0, lo=1.0, hi=21.0, curriculum_epochs=10):
        super().__init__()
        self.lo, self.hi, self.epochs = lo, hi, curriculum_epochs
        self.theta = nn.Parameter(torch.logit(torch.tensor((t_init - lo) / (hi - lo))))

    def temperature(self, lam: float = 0.0):
        theta = (1 + lam) * self.theta.detach() - lam * self.theta  # value theta, gradient -lam
        return self.lo + (self.hi - self.lo) * torch.sigmoid(theta)

    def forward(self, *, student, teacher, target=None, progress):
        t = self.temperature((1 - math.cos(math.pi * min(1, progress.epoch / self.epochs))) / 2)
        log_p, log_q = (F.log_softmax(z.float() / t, dim=-1) for z in (student, teacher.detach()))
        return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t


class CurriculumTemperatureKD(OfflineDistillation):
    """Hinton KD whose temperature is learned against the student (CTKD, Li et al. 2023)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, alpha: float = 0.9,
                 curriculum_epochs: int = 10, optimizer: OptimizerCallable = default_optimizer):
        kd = LossTerm(LearnableTemperatureKL(curriculum_epochs=curriculum_epochs), alpha, name="kd")
        ce = LossTerm(HardLabelCrossEntropy(), 1 - alpha, name="ce")
        super().__init__(student, teacher, loss_terms=[kd, ce], optimizer=optimizer)

    def forward_knowledge(self, batch, stage):
        knowledge = super().forward_knowledge(batch, stage)
        knowledge["log.temperature"] = self.objective[0].loss.temperature().detach()
        return knowledge''',
    ),
    (
        "md",
        "## Check the method's equations\n\nAt `T = 4` the loss is Hinton's (the library's "
        "`SoftTargetKLLoss`); θ's gradient is `-λ` times the loss's derivative (a finite "
        "difference), 0 in the first epoch; the student's gradient is not reversed.",
    ),
    (
        "code",
        """\
from kd_lightning.losses import SoftTargetKLLoss
from kd_lightning.objective import Progress

torch.manual_seed(0)
s, t = torch.randn(16, 10, requires_grad=True), torch.randn(16, 10)
ctkd = LearnableTemperatureKL(t_init=4.0, curriculum_epochs=10)
assert abs(ctkd.temperature().item() - 4.0) < 1e-5
value = ctkd(student=s, teacher=t, progress=Progress(epoch=5))  # lambda = 1/2
assert torch.allclose(value, SoftTargetKLLoss(temperature=4.0)(student=s, teacher=t), atol=1e-5)
value.backward()

def loss_at(theta):  # the same loss with theta moved, no reversal involved
    moved = LearnableTemperatureKL(curriculum_epochs=10)
    moved.theta.data.fill_(theta)
    return moved(student=s.detach(), teacher=t, progress=Progress(epoch=0)).item()

eps, theta = 1e-2, ctkd.theta.item()  # float32 losses: a step well above their rounding
derivative = (loss_at(theta + eps) - loss_at(theta - eps)) / (2 * eps)
assert abs(ctkd.theta.grad.item() - (-0.5 * derivative)) < 0.02 * abs(derivative)
student_grad = s.grad.clone()
s.grad = None
ctkd.theta.grad = None
ctkd(student=s, teacher=t, progress=Progress(epoch=0)).backward()
assert ctkd.theta.grad.item() == 0  # lambda = 0 in the first epoch: T does not move
assert torch.allclose(s.grad, student_grad)  # the student's gradient is never reversed
print(f"dL/dtheta = {derivative:.4f}; theta's gradient at lambda 1/2 = {-0.5 * derivative:.4f}")""",
    ),
    (
        "md",
        """\
## Compare them with KD in a small study

The study takes runs built in Python: the digits configs with overrides. The new loss goes
into the KD term's place by its class path, `__main__.SoftTargetJSLoss` (classes defined in a
notebook live in `__main__`); the CE term stays. The new method replaces the config's
method, `__main__.CurriculumTemperatureKD`, and brings its own objective. All students see 10%
of the labels.""",
    ),
    (
        "code",
        """\
import yaml

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
ctkd_config = yaml.safe_load((ROOT / "experiments/digits/hinton_kd.yaml").read_text())
ctkd_config["model"]["class_path"] = "__main__.CurriculumTemperatureKD"
del ctkd_config["model"]["init_args"]["loss_terms"]  # the method brings its own
study = Study.from_dict(
    {
        "name": "prototype",
        "seeds": [0] if FAST else [0, 1, 2],
        "output_dir": str(OUT / "prototype"),
        "reference_teacher": "teacher",
        "baseline": "student_alone@10%",
        "runs": [
            {"name": "teacher", "config": "teacher.yaml", "baseline": None},
            {"name": "student_alone@10%", "config": "student_alone.yaml", "overrides": ten_percent},
            {"name": "hinton_kd@10%", "config": "hinton_kd.yaml", "overrides": ten_percent, "needs": needs},
            {"name": "js_kd@10%", "config": "hinton_kd.yaml", "overrides": {**ten_percent, **js_term}, "needs": needs},
            {"name": "ctkd@10%", "config": ctkd_config, "overrides": ten_percent, "needs": needs},
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
        "## What the runs logged\n\nEvery loss term is logged under its name: `train/loss_js` "
        "for the new loss; the new method's temperature is `train/temperature`.",
    ),
    (
        "code",
        """\
import csv


def epoch_curve(run_name, key):
    run = next(r for r in results if r["run"] == run_name)
    with (Path(run["checkpoint"]).parent / "logs" / "metrics.csv").open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


js_curve = epoch_curve("js_kd@10%", "train/loss_js_epoch")
temperatures = epoch_curve("ctkd@10%", "train/temperature_epoch")
print("train/loss_js per epoch:", [round(v, 4) for v in js_curve])
print("CTKD temperature per epoch:", [round(v, 3) for v in temperatures])

rows = {row["run"]: row for row in results.rows}
assert {"js_kd@10%", "ctkd@10%"} <= set(rows), "the prototypes have their rows in the table"
assert js_curve[-1] < js_curve[0], "the student moves towards the teacher under the new loss"
assert rows["js_kd@10%"]["delta_last"] > 0, "JS distillation beats the student alone at 10% labels"
assert rows["ctkd@10%"]["delta_last"] > 0, "CTKD beats the student alone at 10% labels"
assert abs(temperatures[0] - 4.0) < 1e-4, "lambda = 0 in the first epoch: T stays at its start"
assert temperatures[-1] != temperatures[0] and all(1 < t < 21 for t in temperatures)
for name in ("hinton_kd@10%", "js_kd@10%", "ctkd@10%", "student_alone@10%"):
    print(f"{name:18} {rows[name]['acc_last_mean']:.1f}%")""",
    ),
    (
        "md",
        "## The same in plain Python\n\nOutside a study, the loss goes straight into "
        "`OfflineDistillation` with a `LossTerm`, and the method is built like any other; both "
        "train with any Lightning `Trainer`.",
    ),
    (
        "code",
        """\
import lightning as L

from kd_lightning import PretrainedTeacher
from kd_lightning.data import DigitsTransferSet
from kd_lightning.models import MLP

teacher_checkpoint = next(r for r in results if r["run"] == "teacher")["checkpoint"]
methods = {
    "js": OfflineDistillation(
        student=MLP(num_classes=10, hidden_sizes=[32]),
        teacher=PretrainedTeacher(teacher_checkpoint),
        loss_terms=[
            LossTerm(SoftTargetJSLoss(temperature=4.0), weight=0.9, name="js"),
            LossTerm(HardLabelCrossEntropy(), weight=0.1, name="ce"),
        ],
    ),
    "ctkd": CurriculumTemperatureKD(
        student=MLP(num_classes=10, hidden_sizes=[32]), teacher=PretrainedTeacher(teacher_checkpoint)
    ),
}
for name, method in methods.items():
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, DigitsTransferSet(labeled_fraction=0.1))
    print(name, sorted(k for k in trainer.callback_metrics if k.startswith("train/")))
assert {"train/loss_js_epoch", "val/agreement"} <= set(methods["js"].trainer.callback_metrics)
assert "train/temperature_epoch" in methods["ctkd"].trainer.callback_metrics
# the temperature is trained by the method's own optimizer, the teacher is not
parameters = {id(p) for p in methods["ctkd"].trainable_parameters()}
assert id(methods["ctkd"].objective[0].loss.theta) in parameters
assert not parameters & {id(p) for p in methods["ctkd"].teacher.parameters()}""",
    ),
]
