"""Hugging Face models as they are: built from configs, loaded from directories, frozen as
teachers, and DistilBERT-style shallow copies whose blocks are the teacher's chosen blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from kd_lightning.models import HFModel, ShallowCopy, instantiate, model_spec, shallow_copy
from kd_lightning.teachers import PretrainedTeacher
from tests.text.conftest import tiny_bert_config, tiny_gpt2_config

IDS = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 10, 11, 3, 0, 0]])
MASK = (IDS != 0).long()


def _bert(layers: int = 4, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return HFModel(model_type="bert", config=tiny_bert_config(40, layers),
                   task="sequence-classification", num_classes=num_classes)  # fmt: skip


def _gpt2(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return HFModel(model_type="gpt2", config=tiny_gpt2_config(layers=layers), num_classes=40)


def test_hf_model_is_the_transformers_model_with_a_self_contained_spec():
    bert = _bert()
    assert type(bert) is transformers.BertForSequenceClassification and bert.training
    assert bert.config.num_labels == 3 and bert(
        input_ids=IDS, attention_mask=MASK
    ).logits.shape == (2, 3)
    gpt2 = _gpt2()
    assert type(gpt2) is transformers.GPT2LMHeadModel and gpt2.config.vocab_size == 40
    assert gpt2(input_ids=IDS).logits.shape == (2, 6, 40)
    for model in (bert, gpt2):  # the recorded spec rebuilds the architecture, no file needed
        rebuilt = instantiate(model_spec(model))
        assert type(rebuilt) is type(model)
        rebuilt.load_state_dict(model.state_dict())  # strict: same parameter names and shapes
    with pytest.raises(ValueError, match="num_labels=4 but the data has 3 classes"):
        HFModel(model_type="bert", config={**tiny_bert_config(40), "num_labels": 4},
                task="sequence-classification", num_classes=3)  # fmt: skip
    with pytest.raises(ValueError, match="task must be one of"):
        HFModel(model_type="bert", task="translation")


def test_pretrained_directory_as_model_and_as_frozen_teacher(tmp_path):
    bert = _bert().eval()
    bert.save_pretrained(tmp_path)
    expected = bert(input_ids=IDS, attention_mask=MASK).logits
    loaded = HFModel(pretrained=str(tmp_path), task="sequence-classification")
    assert torch.equal(loaded.eval()(input_ids=IDS, attention_mask=MASK).logits, expected)
    teacher = PretrainedTeacher(str(tmp_path))
    teacher.train()  # a frozen teacher stays in eval mode
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    knowledge = teacher.teach({"input": {"input_ids": IDS, "attention_mask": MASK}}, {})
    # PretrainedTeacher loads with transformers' default attention (sdpa): equal up to rounding
    torch.testing.assert_close(knowledge["logits"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, path", [(_bert, "bert.encoder.layer"), (_gpt2, "transformer.h")])
def test_shallow_copy_takes_the_chosen_teacher_blocks(make, path):
    teacher = make(layers=4).eval()
    before = copy.deepcopy(teacher.state_dict())
    student = shallow_copy(teacher, layers=[0, 2]).eval()
    assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    t_blocks, s_blocks = teacher.get_submodule(path), student.get_submodule(path)
    for i, j in enumerate([0, 2]):
        for (name, s), (_, t) in zip(
            s_blocks[i].named_parameters(), t_blocks[j].named_parameters(), strict=True
        ):
            assert torch.equal(s, t), name
            assert s.data_ptr() != t.data_ptr()  # copies, not shared
    outside = {k: v for k, v in student.state_dict().items() if not k.startswith(path + ".")}
    assert outside and all(torch.equal(v, before[k]) for k, v in outside.items())
    # The student computes what the teacher computes with only blocks 0 and 2 in its stack.
    pruned = copy.deepcopy(teacher)
    owner, _, leaf = path.rpartition(".")
    setattr(pruned.get_submodule(owner), leaf, nn.ModuleList([t_blocks[0], t_blocks[2]]))
    pruned.config.num_hidden_layers = 2
    with torch.no_grad():
        got = student(input_ids=IDS, attention_mask=MASK).logits
        want = pruned(input_ids=IDS, attention_mask=MASK).logits
        full = shallow_copy(teacher, layers=[0, 1, 2, 3]).eval()(input_ids=IDS, attention_mask=MASK)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.logits, teacher(input_ids=IDS, attention_mask=MASK).logits)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # untouched
    with pytest.raises(ValueError, match="indices in 0..3"):
        shallow_copy(teacher, layers=[0, 4])


def test_distilbert_default_every_other_layer_and_config_overrides(tmp_path):
    teacher = _bert(layers=6)
    teacher.save_pretrained(tmp_path)
    student = ShallowCopy(pretrained=str(tmp_path), num_classes=3,
                          config={"attention_probs_dropout_prob": 0.0})  # fmt: skip
    assert (
        student.config.num_hidden_layers == 3 and student.config.attention_probs_dropout_prob == 0.0
    )
    blocks = teacher.bert.encoder.layer
    for i, j in enumerate([0, 2, 4]):  # DistilBERT: one layer out of two
        assert torch.equal(
            student.bert.encoder.layer[i].output.dense.weight, blocks[j].output.dense.weight
        )
    rebuilt = instantiate(model_spec(student))  # self-contained: no teacher directory needed
    assert rebuilt.config.num_hidden_layers == 3
    rebuilt.load_state_dict(student.state_dict())
