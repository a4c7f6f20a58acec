"""Kind 5: the library's own sentence, first and alone, naming the problem and the fix: through
the CLI (no jsonargparse union dump), for numbers given as strings from Python, for labels that
are not class indices, an empty training set, a teacher of the wrong architecture and a study
file's ``seeds: 3``."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.bench.study_file import Study, StudyError
from kd_lightning.losses import DKDLoss, SoftTargetKLLoss
from kd_lightning.losses.sparse_soft_target import SparseSoftTargetKLLoss
from kd_lightning.methods import OfflineDistillation, Supervised
from kd_lightning.methods.online import MutualDistillation
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.objective import LossTerm
from kd_lightning.teachers import FrozenTeacher, PretrainedTeacher
from tests.safety.conftest import DIGITS, TINY, run_cli, trainer, unchanged, weights

# Plain training loaders without a validation loader: Lightning's note is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")

TEACHER = "--model.init_args.teacher.init_args"


def _edited_hinton(tmp_path, edit) -> str:
    config = yaml.safe_load((DIGITS / "hinton_kd.yaml").read_text())
    edit(config["model"]["init_args"])
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _kd_term(init_args: dict) -> dict:
    return init_args["loss_terms"][0]["init_args"]


@pytest.mark.parametrize(
    ("override", "edit", "sentence"),
    [
        (f"{TEACHER}.checkpoint_path=runs/nope.ckpt", None, "'runs/nope.ckpt' does not exist"),
        (f"{TEACHER}.checkpoint_path=.", None, "has no config.json"),
        (None, lambda a: _kd_term(a).update(weight=-1.0), "must be >= 0"),
        (None, lambda a: _kd_term(a)["loss"]["init_args"].update(temperature=0.0), "must be > 0"),
        ("--model.init_args.optimizer.init_args.lr=-1", None, "Invalid learning rate: -1"),
    ],
    ids=["missing teacher", "folder as teacher", "negative weight", "temperature 0", "lr"],
)
def test_the_cli_prints_the_library_sentence_first_and_alone(
    tmp_path, monkeypatch, capsys, supervised_checkpoint, override, edit, sentence
):
    monkeypatch.chdir(tmp_path)
    config = str(DIGITS / "hinton_kd.yaml") if edit is None else _edited_hinton(tmp_path, edit)
    teacher = f"{TEACHER}.checkpoint_path={supervised_checkpoint}"
    args = ["fit", "-c", config, *TINY, teacher, *([override] if override else [])]
    code, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("kd-lightning: error: ") and sentence in lines[0]
    assert len(lines) <= 3 and "Union" not in err  # the sentence, the traceback hint
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("build", "name", "value"),
    [
        (lambda: SoftTargetKLLoss("4"), "temperature", "'4'"),
        (lambda: SparseSoftTargetKLLoss(temperature="2.0"), "temperature", "'2.0'"),
        (lambda: DKDLoss(temperature="4", alpha=1.0, beta=8.0), "temperature", "'4'"),
        (
            lambda: OfflineDistillation(MLP(), FrozenTeacher(MLP()), temperature="4"),
            "temperature",
            "'4'",
        ),
        (lambda: OfflineDistillation(MLP(), FrozenTeacher(MLP()), alpha="0.5"), "alpha", "'0.5'"),
        (lambda: MutualDistillation([MLP(), MLP()], temperature="3"), "temperature", "'3'"),
        (lambda: LossTerm(SoftTargetKLLoss(), weight="0.9"), "weight", "'0.9'"),
    ],
    ids=["kl", "sparse", "dkd", "offline T", "offline alpha", "dml T", "term weight"],
)
def test_a_number_given_as_a_string_from_python(build, name, value):
    with pytest.raises(TypeError) as error:
        build()
    message = str(error.value)
    assert name in message and value in message and "number" in message
    assert "not supported between" not in message


def test_a_string_that_is_no_number_says_so():
    with pytest.raises(TypeError, match="the string 'four' is not one"):
        SoftTargetKLLoss("four")


def _loaders(target: torch.Tensor, n: int = 64) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 8, 8), target[:n]), batch_size=16)


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (torch.nn.functional.one_hot(torch.arange(64) % 10, 10), TypeError, "one-hot.*argmax"),
        (torch.nn.functional.one_hot(torch.arange(64) % 10, 10).float(), TypeError, "argmax"),
        ((torch.arange(64) % 10).float(), TypeError, r"\.long\(\)"),
        (torch.arange(64) % 10 + 1, ValueError, "1-based.*subtract 1"),
    ],
    ids=["one-hot long", "one-hot float", "float", "1-based"],
)
def test_labels_that_are_not_class_indices_with_plain_loaders(tmp_path, target, error, match):
    model = Supervised(MLP(hidden_sizes=[8]))
    before = weights(model)
    fit = trainer(tmp_path)
    with pytest.raises(error, match=match):
        fit.fit(model, _loaders(target))
    assert fit.global_step == 0 and unchanged(before, model)


@pytest.mark.filterwarnings("ignore:Total length of `.*` across ranks is zero")
@pytest.mark.parametrize("drop_last", [False, True], ids=["no samples", "one short batch dropped"])
def test_an_empty_training_loader_is_an_error_not_a_silent_exit(tmp_path, drop_last):
    n = 0 if not drop_last else 5
    loader = DataLoader(
        TensorDataset(torch.randn(n, 1, 8, 8), torch.zeros(n, dtype=torch.long)),
        batch_size=16,
        drop_last=drop_last,
    )
    fit = trainer(tmp_path, limit_val_batches=0)
    with pytest.raises(ValueError, match="training set is empty.*batch_size"):
        fit.fit(Supervised(MLP(hidden_sizes=[8]), num_classes=10), loader)
    assert fit.global_step == 0


def test_a_teacher_of_the_wrong_architecture_names_both(supervised_checkpoint):
    with pytest.raises(ValueError) as error:
        PretrainedTeacher(str(supervised_checkpoint), model=SmallCNN(width=8), key_prefix="model.")
    message = str(error.value)
    assert "do not fit a SmallCNN" in message and "architecture" in message


@pytest.mark.parametrize(("seeds", "fix"), [(3, "seeds: [0, 1, 2]"), ("0,1", "list")])
def test_seeds_as_a_number_in_a_study_file(tmp_path, seeds, fix):
    path = tmp_path / "study.yaml"
    run = {"name": "alone", "config": str(DIGITS / "student_alone.yaml")}
    path.write_text(yaml.safe_dump({"name": "s", "seeds": seeds, "runs": [run]}))
    with pytest.raises(StudyError, match="seeds") as error:
        Study.from_file(path)
    assert fix in str(error.value)
