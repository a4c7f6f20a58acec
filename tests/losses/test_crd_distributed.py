"""CRD's memory banks under DDP: every process applies every process's update.

Without it each rank's bank holds only its own shard's updates (and DDP's buffer broadcast
then keeps rank 0's), so the banks differ and half the samples' rows go stale. The merge of
gathered rows is checked by hand; two gloo processes check the banks end up identical and
hold the rows of every sample any rank saw.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.data import DigitsTransferSet
from kd_lightning.distributed import gather_rows, mean_of_exp_log, merge_rows
from kd_lightning.losses import CRDLoss, HardLabelCrossEntropy
from kd_lightning.methods import OfflineDistillation
from kd_lightning.models import MLP
from kd_lightning.objective import LossTerm


def test_merge_drops_padding_and_keeps_the_first_rank_row_of_a_repeated_sample():
    # Rank 0 sent 3 rows, rank 1 sent 2 (padded to 3); sample 1 is on both ranks.
    index = torch.tensor([5, 1, 7, 1, 9, 0])
    rows = torch.tensor([[50.0], [10.0], [70.0], [11.0], [90.0], [-1.0]])
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    merged_index, merged_rows, merged_labels = merge_rows([3, 2], index, rows, labels)
    assert merged_index.tolist() == [5, 1, 7, 9]
    assert merged_rows.tolist() == [[50.0], [10.0], [70.0], [90.0]]
    assert merged_labels.tolist() == [0, 1, 2, 4]
    # An empty rank contributes nothing; one process with repeats keeps the first.
    index, rows = merge_rows([0, 2], torch.tensor([0, 0, 4, 4]), torch.tensor([1.0, 2, 3, 4]))
    assert index.tolist() == [4] and rows.tolist() == [3.0]


def test_one_process_gets_its_input_back():
    index, rows = torch.tensor([3, 3, 1]), torch.randn(3, 4)
    got = gather_rows(index, rows)
    assert got[0] is index and got[1] is rows
    log_z = torch.tensor([0.5, 2.0])
    assert mean_of_exp_log(log_z) is log_z


class BankRecorder(Callback):
    """Each rank writes its CRD banks, its normaliser and the sample indices it trained on."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(batch["index"].detach().cpu())

    def on_train_end(self, trainer, module):
        crd = module.objective[0].loss
        torch.save(
            {
                "student": crd.memory_student.clone(),
                "teacher": crd.memory_teacher.clone(),
                "log_normalizer": crd.log_normalizer.clone(),
                "seen": torch.cat(self.seen),
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_two_gloo_processes_end_with_the_same_banks_holding_every_rank_update(tmp_path):
    L.seed_everything(0, verbose=False)
    crd = CRDLoss(16, 32, n_data=1257, feat_dim=8, num_negatives=64)
    initial = crd.memory_student.clone()
    terms = [LossTerm(crd, student="hidden", teacher="hidden", name="crd"),
             LossTerm(HardLabelCrossEntropy(), name="ce")]  # fmt: skip
    module = OfflineDistillation(MLP(hidden_sizes=[16]), MLP(hidden_sizes=[32]), loss_terms=terms)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=4,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[BankRecorder(tmp_path)],
    )  # fmt: skip
    trainer.fit(module, DigitsTransferSet(batch_size=32))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("student", "teacher", "log_normalizer"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    seen = torch.cat([r["seen"] for r in ranks]).unique()
    assert len(set(ranks[0]["seen"].tolist()) - set(ranks[1]["seen"].tolist())) > 0
    changed = (ranks[0]["student"] != initial).any(dim=1).nonzero().flatten()
    assert changed.tolist() == seen.tolist()  # every rank's samples, and only those
