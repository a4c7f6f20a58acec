"""The CIFAR-100 suite: the CRD/RepDistiller protocol as LightningCLI configs, with published figures.

Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020), and its code
base RepDistiller, fixed the CIFAR-100 protocol most distillation papers report on; Zhao et al.,
"Decoupled Knowledge Distillation" (CVPR 2022, code base mdistiller) kept it:

- 240 epochs, SGD (momentum 0.9, weight decay 5e-4), batch 64, learning rate 0.05 (0.01 for
  MobileNet/ShuffleNet students), times 0.1 at epochs 150, 180 and 210;
- standard augmentation (pad 4 + random crop, horizontal flip), validation on the test set;
- KD: T = 4, 0.9 KD + 0.1 CE; feature/relation losses: CE 1 + beta x loss (FitNets 100, AT
  1000, SP 3000, RKD 1, CRD 0.8); DKD: CE 1 + DKD(alpha 1, beta 8, T 4) with a 20-epoch
  linear warm-up.

:func:`write_suite` generates ``experiments/cifar100/`` from the tables here (the files are
checked in; ``tests/bench/test_cifar100_suite.py`` checks they match this module). Each config
runs alone (``kd-lightning fit -c experiments/cifar100/<pair>/<method>.yaml`` after the
teacher's config), and ``suite.yaml`` is the study over all of them, whose table prints the
published figure of each row beside ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EPOCHS = 240
MILESTONES = [150, 180, 210]
BATCH_SIZE = 64
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
NUM_TRAIN = 50_000
TEACHER_DIR = "runs/cifar100/teachers"

REPDISTILLER = "CRD paper (Tian et al., ICLR 2020) Table 1 / RepDistiller README"
REPDISTILLER_2 = "CRD paper (Tian et al., ICLR 2020) Table 2 / RepDistiller README"
DKD_PAPER = "DKD paper (Zhao et al., CVPR 2022) Table 1 / mdistiller README"
DKD_PAPER_2 = (
    "DKD paper (Zhao et al., CVPR 2022) Table 2; the mdistiller README labels this column "
    "'ResNet32x4 / MobileNet-V2', but its KD figure 74.45 is CRD's ResNet32x4 -> ShuffleNetV2"
)


@dataclass(frozen=True)
class Architecture:
    """A zoo model and the layers the feature/relation methods hook (RepDistiller's choices)."""

    name: str
    class_name: str
    stages: dict[str, tuple[int, int]]  # layer -> (channels, spatial size) on 32x32 inputs
    hint: str  # FitNets hint layer (RepDistiller's feat[2])
    last: str  # last feature map (SP, RepDistiller's feat[-2])
    pool: int  # width of the pooled embedding "pool" (RKD, CRD)
    lr: float = 0.05

    @property
    def class_path(self) -> str:
        return f"kd_lightning.models.{self.class_name}"


def _resnet(name: str, class_name: str, width: int) -> Architecture:
    stages = {"layer1": (width, 32), "layer2": (2 * width, 16), "layer3": (4 * width, 8)}
    return Architecture(name, class_name, stages, "layer2", "layer3", 4 * width)


def _wrn(name: str, class_name: str, k: int) -> Architecture:
    stages = {"block1": (16 * k, 32), "block2": (32 * k, 16), "block3": (64 * k, 8)}
    return Architecture(name, class_name, stages, "block2", "block3", 64 * k)


def _vgg(name: str, class_name: str) -> Architecture:
    stages = {
        "block0": (64, 32), "block1": (128, 16), "block2": (256, 8),
        "block3": (512, 4), "block4": (512, 4),
    }  # fmt: skip
    return Architecture(name, class_name, stages, "block2", "block4", 512)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        _resnet("resnet32x4", "ResNet32x4", 64),
        _resnet("resnet8x4", "ResNet8x4", 64),
        _resnet("resnet56", "ResNet56", 16),
        _resnet("resnet20", "ResNet20", 16),
        _resnet("resnet110", "ResNet110", 16),
        _resnet("resnet32", "ResNet32", 16),
        _wrn("wrn_40_2", "WRN40x2", 2),
        _wrn("wrn_16_2", "WRN16x2", 2),
        _wrn("wrn_40_1", "WRN40x1", 1),
        _vgg("vgg13", "VGG13"),
        _vgg("vgg8", "VGG8"),
        Architecture(
            "shufflenetv2",
            "ShuffleNetV2",
            {"layer1": (116, 16), "layer2": (232, 8), "layer3": (464, 4), "head": (1024, 4)},
            hint="layer2",
            last="layer3",
            pool=1024,
            lr=0.01,
        ),
    ]
}

#: (teacher, student) pairs of the suite, in table order.
PAIRS: list[tuple[str, str]] = [
    ("resnet32x4", "resnet8x4"),
    ("wrn_40_2", "wrn_16_2"),
    ("resnet56", "resnet20"),
    ("vgg13", "vgg8"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "shufflenetv2"),
]

METHODS = ["kd", "dkd", "fitnets", "at", "sp", "rkd", "crd"]

#: Published top-1 test accuracy (%) on CIFAR-100: key (teacher, student) -> row -> figure.
#: "teacher"/"student" are the networks trained alone. Each is the paper's mean of its runs
#: (CRD: "averaged over 5 runs"; the reported epoch is the best one, chosen on the test set).
PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    ("resnet32x4", "resnet8x4"): dict(
        teacher=79.42, student=72.50, kd=73.33, fitnets=73.50, at=73.44, sp=72.94, rkd=71.90,
        crd=75.51, dkd=76.32,
    ),
    ("wrn_40_2", "wrn_16_2"): dict(
        teacher=75.61, student=73.26, kd=74.92, fitnets=73.58, at=74.08, sp=73.83, rkd=73.35,
        crd=75.48, dkd=76.23,
    ),
    ("resnet56", "resnet20"): dict(
        teacher=72.34, student=69.06, kd=70.66, fitnets=69.21, at=70.55, sp=69.67, rkd=69.61,
        crd=71.16, dkd=71.97,
    ),
    ("vgg13", "vgg8"): dict(
        teacher=74.64, student=70.36, kd=72.98, fitnets=71.02, at=71.43, sp=72.68, rkd=71.48,
        crd=73.94, dkd=74.68,
    ),
    ("wrn_40_2", "wrn_40_1"): dict(
        teacher=75.61, student=71.98, kd=73.54, fitnets=72.24, at=72.77, sp=72.43, rkd=72.22,
        crd=74.14, dkd=74.81,
    ),
    ("resnet110", "resnet32"): dict(
        teacher=74.31, student=71.14, kd=73.08, fitnets=71.06, at=72.31, sp=72.69, rkd=71.82,
        crd=73.48, dkd=74.11,
    ),
    ("resnet32x4", "shufflenetv2"): dict(
        teacher=79.42, student=71.82, kd=74.45, fitnets=73.54, at=72.73, sp=74.56, rkd=73.21,
        crd=75.65, dkd=77.07,
    ),
}  # fmt: skip


def published_source(pair: tuple[str, str], row: str) -> str:
    different = pair[1] == "shufflenetv2"
    if row == "dkd":
        return DKD_PAPER_2 if different else DKD_PAPER
    return REPDISTILLER_2 if different else REPDISTILLER


# --------------------------------------------------------------------------- config pieces
def _term(name: str, weight: float, loss: str, loss_args: dict | None = None, **extra) -> dict:
    loss_spec: dict[str, Any] = {"class_path": f"kd_lightning.losses.{loss}"}
    if loss_args:
        loss_spec["init_args"] = loss_args
    return {
        "class_path": "kd_lightning.methods.LossTerm",
        "init_args": {"name": name, "weight": weight, "loss": loss_spec, **extra},
    }


def _ce(weight: float = 1.0) -> dict:
    return _term("ce", weight, "HardLabelCrossEntropy")


def loss_terms(method: str, teacher: Architecture, student: Architecture) -> list[dict]:
    """The objective of ``method`` for one pair, with RepDistiller's weights and layers."""
    if method == "kd":
        return [_term("kd", 0.9, "SoftTargetKLLoss", {"temperature": 4.0}), _ce(0.1)]
    if method == "dkd":
        dkd = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}
        return [_ce(), _term("dkd", 1.0, "DKDLoss", dkd, warmup_epochs=20)]
    if method == "fitnets":
        channels, size = student.stages[student.hint]
        t_channels, t_size = teacher.stages[teacher.hint]
        connector = {"in_channels": channels, "out_channels": t_channels}
        if size != t_size:
            connector["output_size"] = t_size
        hint = _term(
            "hint", 100.0, "FitNetsHintLoss", student=student.hint, teacher=teacher.hint,
            connector={"class_path": "kd_lightning.connectors.Conv1x1Connector", "init_args": connector},
        )  # fmt: skip
        return [_ce(), hint]
    if method == "at":
        terms = [_ce()]
        for s_layer, t_layer in attention_pairs(teacher, student):
            terms.append(
                _term(f"at_{s_layer}", 1000.0, "AttentionTransferLoss", {"p": 2.0},
                      student=s_layer, teacher=t_layer)
            )  # fmt: skip
        return terms
    if method == "sp":
        sp = _term(
            "sp", 3000.0, "SimilarityPreservingLoss", student=student.last, teacher=teacher.last
        )
        return [_ce(), sp]
    if method == "rkd":
        rkd = {"distance_weight": 25.0, "angle_weight": 50.0}
        return [_ce(), _term("rkd", 1.0, "RKDLoss", rkd, student="pool", teacher="pool")]
    if method == "crd":
        crd = {
            "student_dim": student.pool, "teacher_dim": teacher.pool, "n_data": NUM_TRAIN,
            "feat_dim": 128, "num_negatives": 16384, "nce_t": 0.07, "momentum": 0.5,
        }  # fmt: skip
        return [_ce(), _term("crd", 0.8, "CRDLoss", crd, student="pool", teacher="pool")]
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def attention_pairs(teacher: Architecture, student: Architecture) -> list[tuple[str, str]]:
    """AT layer pairs: RepDistiller's ``feat[1:-1]`` (every stage; VGG from block1), index-matched
    for networks of one family; for other pairs, student stages matched to the teacher stage
    of the same spatial size (stages without one are left out)."""

    def at_stages(arch: Architecture) -> list[str]:
        names = list(arch.stages)
        return names[1:] if names[0] == "block0" else names

    if list(teacher.stages) == list(student.stages):
        return list(zip(at_stages(student), at_stages(teacher), strict=True))
    pairs = []
    for s_layer, (_, s_size) in student.stages.items():
        t_layer = next((t for t, (_, size) in teacher.stages.items() if size == s_size), None)
        if t_layer is not None and t_layer not in [t for _, t in pairs]:
            pairs.append((s_layer, t_layer))
    return pairs


def _optimizer(lr: float) -> dict:
    return {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
    }


def _scheduler() -> dict:
    return {
        "class_path": "torch.optim.lr_scheduler.MultiStepLR",
        "init_args": {"milestones": list(MILESTONES), "gamma": 0.1},
    }


def _data() -> dict:
    return {
        "class_path": "kd_lightning.data.CIFAR100TransferSet",
        "init_args": {"root": "data", "download": True, "batch_size": BATCH_SIZE},
    }


def _trainer(name: str, callbacks: list | None = None) -> dict:
    trainer: dict[str, Any] = {
        "max_epochs": EPOCHS,
        "log_every_n_steps": 50,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "runs/cifar100", "name": name},
        },
    }
    if callbacks:
        trainer["callbacks"] = callbacks
    return trainer


def teacher_checkpoint(arch: str) -> str:
    return f"{TEACHER_DIR}/{arch}/teacher.ckpt"


def supervised_config(arch: Architecture, teacher: bool) -> dict:
    callbacks = None
    if teacher:
        callbacks = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": f"{TEACHER_DIR}/{arch.name}",
                    "filename": "teacher",
                    "enable_version_counter": False,
                },
            }
        ]
    return {
        "seed_everything": 0,
        "trainer": _trainer(f"{'teacher' if teacher else 'alone'}_{arch.name}", callbacks),
        "model": {
            "class_path": "kd_lightning.methods.Supervised",
            "init_args": {
                "model": {"class_path": arch.class_path},
                "optimizer": _optimizer(arch.lr),
                "lr_scheduler": _scheduler(),
            },
        },
        "data": _data(),
    }


def distill_config(method: str, teacher: Architecture, student: Architecture) -> dict:
    return {
        "seed_everything": 0,
        "trainer": _trainer(f"{method}_{teacher.name}_{student.name}"),
        "model": {
            "class_path": "kd_lightning.methods.OfflineDistillation",
            "init_args": {
                "student": {"class_path": student.class_path},
                "teacher": {
                    "class_path": "kd_lightning.teachers.PretrainedTeacher",
                    "init_args": {"checkpoint_path": teacher_checkpoint(teacher.name)},
                },
                "loss_terms": loss_terms(method, teacher, student),
                "optimizer": _optimizer(student.lr),
                "lr_scheduler": _scheduler(),
            },
        },
        "data": _data(),
    }


METHOD_TITLES = {
    "kd": "KD (Hinton et al. 2015): T=4, 0.9 KD + 0.1 CE",
    "dkd": "DKD (Zhao et al. 2022): CE + DKD(alpha 1, beta 8, T 4), 20-epoch warm-up",
    "fitnets": "FitNets (Romero et al. 2015): CE + 100 x hint MSE through a 1x1 conv regressor",
    "at": "AT (Zagoruyko & Komodakis 2017): CE + 1000 x attention transfer per stage",
    "sp": "SP (Tung & Mori 2019): CE + 3000 x similarity preserving on the last stage",
    "rkd": "RKD (Park et al. 2019): CE + RKD (distance 25, angle 50) on the pooled embedding",
    "crd": "CRD (Tian et al. 2020): CE + 0.8 x contrastive loss (16384 negatives, T 0.07)",
}


def _header(lines: list[str]) -> str:
    return "".join(f"# {line}\n" for line in lines)


PROTOCOL_LINE = (
    "CRD/RepDistiller CIFAR-100 protocol: 240 epochs, SGD 0.9, wd 5e-4, batch 64, "
    "x0.1 at 150/180/210."
)


def suite_files() -> dict[str, str]:
    """Relative path -> file content of every config of the suite, and ``suite.yaml``."""
    files: dict[str, str] = {}
    dump = lambda config: yaml.safe_dump(config, sort_keys=False, width=100)  # noqa: E731
    teachers = sorted({t for t, _ in PAIRS}, key=[t for t, _ in PAIRS].index)
    for name in teachers:
        arch = ARCHITECTURES[name]
        files[f"teachers/{name}.yaml"] = _header(
            [
                f"Teacher {name} ({arch.class_name}) on CIFAR-100, lr {arch.lr}.",
                PROTOCOL_LINE,
                f"  kd-lightning fit -c experiments/cifar100/teachers/{name}.yaml",
                f"writes {teacher_checkpoint(name)}, the teacher of the configs of its pairs.",
            ]
        ) + dump(supervised_config(arch, teacher=True))
    for teacher, student in PAIRS:
        arch = ARCHITECTURES[student]
        files[f"students/{student}.yaml"] = _header(
            [
                f"Student {student} ({arch.class_name}) alone on CIFAR-100 (the baseline), lr {arch.lr}.",
                PROTOCOL_LINE,
            ]
        ) + dump(supervised_config(arch, teacher=False))
        for method in METHODS:
            published = PUBLISHED[(teacher, student)][method]
            files[f"{teacher}-{student}/{method}.yaml"] = _header(
                [
                    f"{METHOD_TITLES[method]}.",
                    f"Teacher {teacher} -> student {student}; published: {published:.2f} "
                    f"({published_source((teacher, student), method)}).",
                    PROTOCOL_LINE + f" Student lr {arch.lr}.",
                    f"Needs the teacher: kd-lightning fit -c experiments/cifar100/teachers/{teacher}.yaml",
                ]
            ) + dump(distill_config(method, ARCHITECTURES[teacher], arch))
    files["suite.yaml"] = _header(
        [
            "The CIFAR-100 suite: every pair x method of the CRD/RepDistiller protocol, published vs ours.",
            "  kd-lightning study experiments/cifar100/suite.yaml            # everything, 3 seeds (GPU)",
            "  kd-lightning study experiments/cifar100/suite.yaml --seeds 0 --only resnet8x4.kd",
            "Needs the CIFAR-100 archive under data/ (downloaded on first use, MD5-checked).",
            "Generated by kd_lightning.bench.cifar100_suite.write_suite; edit that module, not these files.",
        ]
    ) + dump(suite_study())
    return files


def suite_study() -> dict:
    """The study over the whole suite (teachers, students alone, every method), with published figures."""
    runs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for teacher, student in PAIRS:
        figures = PUBLISHED[(teacher, student)]
        if teacher not in seen:
            seen.add(teacher)
            runs.append(
                {
                    "name": f"teacher.{teacher}",
                    "config": f"teachers/{teacher}.yaml",
                    "published": {
                        "test_acc": figures["teacher"],
                        "source": published_source((teacher, student), "teacher"),
                    },
                    "baseline": None,
                }
            )
        alone = f"{student}.alone"
        runs.append(
            {
                "name": alone,
                "config": f"students/{student}.yaml",
                "published": {
                    "test_acc": figures["student"],
                    "source": published_source((teacher, student), "student"),
                },
                "baseline": None,
            }
        )
        for method in METHODS:
            runs.append(
                {
                    "name": f"{student}.{method}",
                    "config": f"{teacher}-{student}/{method}.yaml",
                    "needs": {
                        "model.init_args.teacher.init_args.checkpoint_path": f"teacher.{teacher}"
                    },
                    "baseline": alone,
                    "published": {
                        "test_acc": figures[method],
                        "source": published_source((teacher, student), method),
                    },
                }
            )
    return {
        "name": "cifar100-crd",
        "seeds": [0, 1, 2],
        "output_dir": "results/cifar100",
        "runs": runs,
    }


def write_suite(folder: str | Path) -> list[Path]:
    """(Re)write the suite's files under ``folder`` (``experiments/cifar100``)."""
    folder = Path(folder)
    written = []
    for relative, content in suite_files().items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(path)
    return written


if __name__ == "__main__":  # python -m kd_lightning.bench.cifar100_suite [folder]
    import sys

    for path in write_suite(sys.argv[1] if len(sys.argv) > 1 else "experiments/cifar100"):
        print(path)
