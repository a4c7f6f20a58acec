"""On-policy distillation (GKD): what the loss reads, lambda=0, seeded samples, exact resume.

Tiny GPT-2 student and teacher built from their configs (no download). Expected values are
computed here from the equations (a loop over tokens), never from the method's earlier output.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")

from kd_lightning.losses import TokenGeneralizedJSDLoss, TokenReverseKLLoss  # noqa: E402
from kd_lightning.methods import OfflineDistillation, OnPolicyDistillation  # noqa: E402
from kd_lightning.models import HFModel  # noqa: E402
from kd_lightning.objective import LossTerm  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*self.trainer.*reference is not registered.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]

VOCAB = 30
EOS = 5


def _gpt2(seed: int, layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = dict(n_layer=layers, n_embd=16, n_head=2, n_positions=32, bos_token_id=EOS,
                  eos_token_id=EOS, pad_token_id=0)  # fmt: skip
    return HFModel(model_type="gpt2", task="causal-lm", config=config, num_classes=VOCAB)


def _batch(seed: int = 1, rows: int = 3, length: int = 10) -> dict:
    ids = torch.randint(6, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "target": ids}


def _method(**kwargs) -> OnPolicyDistillation:
    settings = dict(prompt_length=4, max_new_tokens=5, num_classes=VOCAB, seed=0)
    settings.update(kwargs)
    return OnPolicyDistillation(_gpt2(0), _gpt2(1, layers=2), **settings)


def _jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> float:
    """GKD eq. 1 for one token, from the probabilities, term by term."""
    total = 0.0
    for pi, qi in zip(p.tolist(), q.tolist(), strict=True):
        mi = beta * pi + (1 - beta) * qi
        total += beta * pi * math.log(pi / mi) + (1 - beta) * qi * math.log(qi / mi)
    return total


def test_the_loss_reads_the_generated_tokens_only():
    method = _method(lmbda=1.0, eos_token_id=None)
    method.check_example(_batch())
    samples = method.student_samples(_batch(), ("train", 0), 1.0)
    target, mask = samples["target"], samples["input"]["attention_mask"]
    # Labels sit on the 5 generated tokens of every row, never on the 4 prompt tokens.
    assert (target[:, :4] == -100).all() and (target[:, 4:] >= 0).all()
    knowledge = method.forward_knowledge(samples, "train")
    loss = method.compute_losses(knowledge, samples, "train")["loss"]
    student, teacher = knowledge["student"].double(), knowledge["teacher"].double()
    expected, count = 0.0, 0
    for b in range(target.shape[0]):
        for t in range(target.shape[1] - 1):
            if target[b, t + 1] != -100 and mask[b, t] and mask[b, t + 1]:
                p, q = teacher[b, t].softmax(-1), student[b, t].softmax(-1)
                expected += _jsd(p, q, 0.5)
                count += 1
    assert count == 3 * 5  # the last prompt token predicts the first generated one, and so on
    assert loss.item() == pytest.approx(expected / count, rel=1e-5)


def test_prompt_and_padding_change_nothing():
    """A teacher that differs only where no generated token is predicted gives the same loss."""
    method = _method(lmbda=1.0, eos_token_id=None)
    samples = method.student_samples(_batch(), ("train", 0), 1.0)
    knowledge = method.forward_knowledge(samples, "train")
    base = method.compute_losses(knowledge, samples, "train")["loss"]
    moved = dict(knowledge, teacher=knowledge["teacher"].clone())
    moved["teacher"][:, :3] += 7.0 * torch.randn_like(moved["teacher"][:, :3])  # prompt positions
    moved["teacher"][:, -1] = float("nan")  # the last position predicts nothing
    assert torch.equal(method.compute_losses(moved, samples, "train")["loss"], base)
    moved["teacher"][:, 3] += 1.0  # the last prompt token predicts the first generated token
    assert not torch.equal(method.compute_losses(moved, samples, "train")["loss"], base)


def test_samples_after_the_end_of_sequence_are_padding():
    method = _method(lmbda=1.0, eos_token_id=EOS, max_new_tokens=8)
    generated = []
    for step in range(30):  # samples of an untrained model hit the EOS token now and then
        samples = method.student_samples(_batch(rows=6), ("train", step), 2.0)
        ids, mask, target = (samples["input"]["input_ids"], samples["input"]["attention_mask"],
                             samples["target"])  # fmt: skip
        for row in range(ids.shape[0]):
            new = ids[row, 4:].tolist()
            if EOS in new[:-1]:
                end = new.index(EOS) + 4
                assert mask[row, : end + 1].all() and not mask[row, end + 1 :].any()
                assert (target[row, end + 1 :] == -100).all() and target[row, end] == EOS
                assert (ids[row, end + 1 :] == method.pad_token_id).all()
                generated.append(row)
    assert generated  # the case occurred


def test_lambda_zero_is_supervised_token_kd_exactly():
    terms = lambda: [LossTerm(TokenGeneralizedJSDLoss(beta=0.5), name="kd")]  # noqa: E731
    on_policy = _method(lmbda=0.0, loss_terms=terms())
    supervised = OfflineDistillation(
        copy.deepcopy(on_policy.student), copy.deepcopy(on_policy.teacher.module),
        loss_terms=terms(), num_classes=VOCAB,
    )  # fmt: skip
    for seed in range(3):  # the student has dropout: both steps start from one global state
        batch = _batch(seed)
        torch.manual_seed(seed)
        ours = on_policy.training_step(batch, 0)
        torch.manual_seed(seed)
        assert torch.equal(ours, supervised.training_step(batch, 0))


def test_same_seed_same_samples_and_no_dependence_on_the_global_generator():
    first, second, other = _method(seed=7), _method(seed=7), _method(seed=8)
    a = first.student_samples(_batch(), ("train", 3), 1.0)["input"]["input_ids"]
    torch.rand(100)  # draws from the global generator in between change nothing
    b = second.student_samples(_batch(), ("train", 3), 1.0)["input"]["input_ids"]
    c = other.student_samples(_batch(), ("train", 3), 1.0)["input"]["input_ids"]
    d = first.student_samples(_batch(), ("train", 4), 1.0)["input"]["input_ids"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    coins = [first.on_policy_coin(i) for i in range(200)]
    assert coins == [second.on_policy_coin(i) for i in range(200)]
    assert 0.4 < sum(coins) / 200 < 0.6  # lambda 0.5


def test_generation_leaves_the_student_in_train_mode_and_needs_no_gradient():
    method = _method(lmbda=1.0)
    method.train()
    samples = method.student_samples(_batch(), ("train", 0), 1.0)
    assert method.student.training and not samples["input"]["input_ids"].requires_grad


def test_reverse_kl_is_a_choice_of_token_loss():
    method = _method(lmbda=1.0, loss_terms=[LossTerm(TokenReverseKLLoss(), name="minillm")])
    loss = method.training_step(_batch(), 0)
    assert loss.requires_grad and math.isfinite(loss.item()) and loss.item() > 0


def test_start_up_names_missing_room_and_a_missing_teacher():
    with pytest.raises(ValueError, match="max_new_tokens"):
        _method(prompt_length=20, max_new_tokens=20).check_example(_batch(length=24))
    alone = OnPolicyDistillation(_gpt2(0), None, prompt_length=4, num_classes=VOCAB)
    with pytest.raises(ValueError, match="live teacher"):
        alone.check_example(_batch())
    with pytest.raises(ValueError, match="lmbda"):
        _method(lmbda=1.5)


class _ResumableBatches:
    """A fixed list of batches that resumes where a checkpoint left it (Lightning's stateful
    loader interface)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.start, self.given = batches, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.batches)):
            self.given = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict:
        return {"given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["given"]


def _fit(root, ckpt=None) -> OnPolicyDistillation:
    L.seed_everything(0, verbose=False)
    method = _method(lmbda=0.5)  # dropout 0.1 in the student: the global generator matters too
    batches = [_batch(seed) for seed in range(4)]
    saver = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[saver])  # fmt: skip
    trainer.fit(method, train_dataloaders=_ResumableBatches(batches), ckpt_path=ckpt)
    return method


def test_resume_mid_epoch_is_bitwise_the_unbroken_run(tmp_path):
    method = _method(lmbda=0.5)
    # Batches 6 and 7 (the resumed part) mix a fixed and an on-policy batch, unlike batches 0
    # and 1: a batch counter that restarted at the resume would train on other batches.
    assert [method.on_policy_coin(i) for i in (6, 7)] == [False, True]
    assert [method.on_policy_coin(i) for i in (0, 1)] == [False, False]
    straight = _fit(tmp_path)  # writes step=2,4,6,8; step=6 is in the middle of epoch 2
    resumed = _fit(tmp_path / "again", ckpt=tmp_path / "step=6.ckpt")
    theirs = resumed.state_dict()
    assert [k for k, v in straight.state_dict().items() if not torch.equal(v, theirs[k])] == []
    fresh = _method(lmbda=0.5)
    assert not torch.equal(fresh.student.lm_head.weight, straight.student.lm_head.weight)


def test_bf16_mixed_precision_generates_and_trains():
    L.seed_everything(0, verbose=False)
    method = _method(lmbda=1.0)
    before = method.student.lm_head.weight.detach().clone()
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(method, train_dataloaders=_ResumableBatches([_batch(0), _batch(1)]))
    assert trainer.callback_metrics["train/on_policy"] == 1.0
    weight = method.student.lm_head.weight
    assert torch.isfinite(weight).all() and not torch.equal(weight, before)


class _RecordingOnPolicy(OnPolicyDistillation):
    """Saves each rank's training samples and final student weights (spawned processes)."""

    def student_samples(self, batch, key, temperature, max_new_tokens=None):
        samples = super().student_samples(batch, key, temperature, max_new_tokens)
        if key[0] == "train":
            self.__dict__.setdefault("recorded", []).append(samples["input"]["input_ids"])
        return samples

    def on_fit_end(self) -> None:
        super().on_fit_end()
        record = {"samples": self.__dict__.get("recorded", []),
                  "weight": self.student.lm_head.weight.detach().clone()}  # fmt: skip
        torch.save(record, f"rank{self.global_rank}.pt")  # in the test's working folder


@pytest.mark.slow
def test_two_ddp_processes_sample_their_own_continuations_and_stay_in_sync(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    L.seed_everything(0, verbose=False)
    method = _RecordingOnPolicy(_gpt2(0), _gpt2(1, layers=2), lmbda=1.0, prompt_length=4,
                                max_new_tokens=5, num_classes=VOCAB, seed=0)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(method, train_dataloaders=torch.utils.data.DataLoader(
        [_batch(0), _batch(0), _batch(1), _batch(1)], batch_size=None))  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["samples"]) == len(ranks[1]["samples"]) == 2
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # gradients were all-reduced
    # Each rank's prompts are the same here, its samples its own (the rank seeds the noise).
    assert not torch.equal(ranks[0]["samples"][0], ranks[1]["samples"][0])
