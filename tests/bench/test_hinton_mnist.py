"""Bias-shift selection of the Hinton et al. (2015) omitted-class experiments, by hand."""

import pytest
import torch

from kd_lightning.bench.hinton_mnist import (
    count_errors,
    select_bias_shift,
    shift_class_logits,
)

# Four samples, class 2 is the one whose bias moves by s:
#   a: [2, 0, 1],   target 2 -> right when 1 + s > 2,   i.e. s > 1
#   b: [0, 3, 1.5], target 2 -> right when 1.5 + s > 3, i.e. s > 1.5
#   c: [4, 0, 0],   target 0 -> right when s < 4
#   d: [0, 2.5, 0], target 1 -> right when s < 2.5
# so the errors are 2 for s <= 1, 1 on (1, 1.5], 0 on (1.5, 2.5), 1 on [2.5, 4), 2 from 4 on.
LOGITS = torch.tensor([[2.0, 0, 1], [0, 3, 1.5], [4, 0, 0], [0, 2.5, 0]])
TARGETS = torch.tensor([2, 2, 0, 1])


def test_errors_as_a_function_of_the_shift_match_the_hand_count():
    shifts = [0.0, 1.2, 2.0, 3.0, 5.0]
    _, errors = select_bias_shift(LOGITS, TARGETS, [2], shifts)
    assert errors == [2, 1, 0, 1, 2]
    assert count_errors(shift_class_logits(LOGITS, [2], 2.0), TARGETS, on_class=2) == 0
    assert count_errors(LOGITS, TARGETS, on_class=2) == 2
    assert count_errors(LOGITS, TARGETS, on_class=0) == 0


def test_the_smallest_shift_of_the_error_free_interval_is_chosen():
    shifts = [round(-5 + 0.1 * i, 1) for i in range(101)]
    shift, errors = select_bias_shift(LOGITS, TARGETS, [2], shifts)
    assert shift == pytest.approx(1.6)  # (1.5, 2.5) is error-free; 1.6 is its point nearest 0
    assert min(errors) == 0


def test_lowering_the_kept_classes_equals_raising_the_others():
    # Softmax/argmax only see differences of logits: -s on {0, 1} == +s on {2}.
    shifts = [round(-5 + 0.1 * i, 1) for i in range(101)]
    up, errors_up = select_bias_shift(LOGITS, TARGETS, [2], shifts)
    down, errors_down = select_bias_shift(LOGITS, TARGETS, [0, 1], shifts)
    assert down == pytest.approx(-up) and errors_down == errors_up[::-1]


def test_shift_leaves_other_classes_and_the_input_unchanged():
    shifted = shift_class_logits(LOGITS, [0, 2], -1.0)
    assert torch.equal(shifted[:, 1], LOGITS[:, 1])
    assert torch.equal(shifted[:, 0], LOGITS[:, 0] - 1) and torch.equal(
        shifted[:, 2], LOGITS[:, 2] - 1
    )
    assert LOGITS[0, 0] == 2.0
    with pytest.raises(ValueError, match="at least one"):
        select_bias_shift(LOGITS, TARGETS, [2], [])


def test_docs_quote_the_committed_report():
    """docs/mnist.md's error counts are those of experiments/mnist/results/hinton2015.json."""
    import json
    import statistics
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = json.loads((root / "experiments/mnist/results/hinton2015.json").read_text())
    doc = (root / "docs/mnist.md").read_text()
    for table in ("main", "fashion"):
        for errors in data[table].values():
            if len(errors) > 1:
                mean = f"{sum(errors) / len(errors):.1f}"
                assert f"| {mean} | {', '.join(map(str, errors))} |" in doc, (table, errors)
            else:
                assert f"| {errors[0]} | {errors[0]} (seed 0 only) |" in doc, (table, errors)

    def mean(rows, key, scale=1.0):
        return f"{statistics.mean(scale * r[key] for r in rows):.1f}"

    omit3, only78 = data["omit3"], data["only78"]
    before = f"{mean(omit3, 'errors_before')} ({mean(omit3, 'errors_before_on_class')})"
    after = f"**{mean(omit3, 'errors_after')} ({mean(omit3, 'errors_after_on_class')})**"
    assert before in doc and after in doc
    assert ", ".join(f"{r['shift_val']:+.1f}" for r in omit3) in doc
    scale = 100 / only78[0]["test_size"]
    for key in ("errors_before", "errors_after"):
        assert f"{mean(only78, key, scale)}%" in doc
    assert ", ".join(f"{r['shift_val']:+.1f}" for r in only78) in doc
    for width, row in data["temperature"].items():
        temps = sorted((k for k in row if k != "alone"), key=float)
        cells = [row["alone"][0]] + [row[t][0] for t in temps]
        assert f"| 2x{width} | " + " | ".join(map(str, cells)) + " |" in doc


def test_earlier_rows_fill_only_the_missing_ones_and_are_marked():
    from kd_lightning.bench.hinton_mnist import carry_earlier, format_markdown

    data = {"main": {"teacher": [90], "student_alone": []}, "fashion": {}, "temperature": {}}
    data["earlier"] = {}
    earlier = {
        "main": {"teacher": [116], "student_alone": [146, 147, 155]},
        "temperature": {"300": {"alone": [181], "20.0": [147]}},
    }
    carry_earlier(data, earlier, "commit abc")
    assert data["main"] == {"teacher": [90], "student_alone": [146, 147, 155]}
    assert data["temperature"] == {300: {"alone": [181], 20.0: [147]}}
    assert data["earlier"] == {"main.student_alone": "commit abc", "temperature": "commit abc"}
    text = format_markdown(data)
    # mean of 146, 147, 155 = 149.33; sample std = sqrt(((-3.33)^2 + (-2.33)^2 + 5.67^2) / 2) = 4.93
    assert "| small net 2x800 alone † | 149.3 ± 4.9 | 146, 147, 155 | 3 |" in text
    assert "| teacher 2x1200, dropout + max-norm + jitter | 90 | 90 | 1 |" in text
    assert (
        "| 2x300 | 181 | 147 |" in text and "not re-measured here (temperature): commit abc" in text
    )


def test_reduced_transfer_rows_average_the_seeds():
    from kd_lightning.bench.hinton_mnist import format_markdown

    def seed(before, after, on3_before, on3_after, shift):
        return {
            "class_count": 1010, "errors_before": before, "errors_after": after,
            "errors_before_on_class": on3_before, "errors_after_on_class": on3_after,
            "shift_val": shift, "shift_oracle": shift, "errors_oracle": after,
        }  # fmt: skip

    data = {"main": {}, "fashion": {}, "temperature": {}}
    data["omit3"] = [seed(180, 150, 70, 20, 1.4), seed(190, 160, 80, 30, 2.0)]
    text = format_markdown(data)
    # before: mean 185, std |180 - 190| / sqrt(2) = 7.07; on 3s: (70 + 80) / 2 = 75
    assert "| no 3s: errors (on the 1010 test 3s) | 2 | 185.0 ± 7.1 (75.0) | +1.4, +2.0 |" in text
    assert "| 155.0 ± 7.1 (25.0) |" in text
