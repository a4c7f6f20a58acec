"""Every study figure quoted in README.md and docs/ equals its committed results.csv."""

import csv
import re
from pathlib import Path

import pytest

from kd_lightning.bench import docs_tables

ROOT = Path(__file__).resolve().parents[1]
CORE_CSV = "experiments/digits/results/digits-core/results.csv"


def test_every_docs_figure_equals_its_study_table():
    problems = docs_tables.check(docs_tables.doc_files(ROOT), ROOT)
    assert not problems, "\n".join(problems)


def test_readme_tables_start_with_the_core_study():
    blocks = docs_tables.parse_blocks((ROOT / "README.md").read_text())
    assert blocks and blocks[0].source == CORE_CSV
    for block in blocks:  # every README table comes from a committed study
        assert (ROOT / block.source).is_file() and (ROOT / block.source).with_suffix(
            ".md"
        ).is_file()


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


ROWS = [
    {"run": "student_alone@10%", "labeled_fraction": "0.1", "seeds": "3", "acc_last_mean": "91.2",
     "acc_last_std": "1.12", "delta_last": "", "agreement_mean": "91.48", "params": "2410"},
    {"run": "hinton_kd@10%", "labeled_fraction": "0.1", "seeds": "3", "acc_last_mean": "96.02",
     "acc_last_std": "0.42", "delta_last": "4.82", "agreement_mean": "96.11", "params": "2410"},
]  # fmt: skip

DOC = """# Results
<!-- table: study/results.csv
columns: [labels, test_acc, delta, agreement, params]
rows:
  hinton_kd@10%: Hinton KD
  student_alone@10%: student alone
-->
old text
<!-- /table -->
after
"""

EXPECTED = """| run | labels | test acc % | Δ vs baseline | agreement % | params |
|---|---:|---:|---:|---:|---:|
| Hinton KD | 10% | 96.02 ± 0.42 | +4.82 | 96.11 | 2,410 |
| student alone | 10% | 91.20 ± 1.12 |  | 91.48 | 2,410 |

*3 seeds, mean ± std, test accuracy of the last epoch; from `study/results.csv`.*
"""


def test_block_rendered_from_the_csv(tmp_path):
    _write_csv(tmp_path / "study/results.csv", ROWS)
    new = docs_tables.regenerate(DOC, tmp_path)
    assert new == DOC.replace("old text\n", EXPECTED)
    assert docs_tables.regenerate(new, tmp_path) == new  # a second run changes nothing


def test_a_changed_or_typed_figure_is_reported(tmp_path):
    _write_csv(tmp_path / "study/results.csv", ROWS)
    doc = tmp_path / "docs/page.md"
    doc.parent.mkdir()
    good = docs_tables.regenerate(DOC, tmp_path)
    doc.write_text(good)
    assert docs_tables.check([doc], tmp_path) == []
    doc.write_text(good.replace("96.02 ± 0.42", "96.20 ± 0.42"))
    [problem] = docs_tables.check([doc], tmp_path)
    assert problem.startswith("docs/page.md: a table differs") and docs_tables.REGENERATE in problem
    doc.write_text(good + "\nKD reaches 96.02 ± 0.42 here.\n")
    [problem] = docs_tables.check([doc], tmp_path)
    assert "outside a generated table ['96.02 ± 0.42']" in problem


def test_a_block_inside_a_code_fence_is_an_example(tmp_path):
    _write_csv(tmp_path / "study/results.csv", ROWS)
    doc = "```markdown\n" + DOC + "```\n"
    assert docs_tables.parse_blocks(doc) == []
    assert docs_tables.regenerate(doc, tmp_path) == doc


def test_main_rewrites_and_checks(tmp_path, capsys):
    _write_csv(tmp_path / "study/results.csv", ROWS)
    (tmp_path / "README.md").write_text(DOC)
    assert docs_tables.main(["--root", str(tmp_path), "--check"]) == 1
    assert docs_tables.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == DOC.replace("old text\n", EXPECTED)
    assert docs_tables.main(["--root", str(tmp_path), "--check"]) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.replace("hinton_kd@10%: Hinton KD", "dkd: DKD"),
         "has no run ['dkd']; its runs are ['hinton_kd@10%', 'student_alone@10%']"),
        (lambda d: d.replace("labels, test_acc", "labels, acc"), "unknown columns ['acc']"),
        (lambda d: d.replace("<!-- /table -->\n", ""), "lacks its `<!-- /table -->`"),
        (lambda d: d.replace("study/results.csv", "study/other.csv"), "other.csv not found"),
    ],
)  # fmt: skip
def test_a_wrong_block_names_the_fix(tmp_path, change, message):
    _write_csv(tmp_path / "study/results.csv", ROWS)
    with pytest.raises(docs_tables.DocsTableError, match=re.escape(message)):
        docs_tables.regenerate(change(DOC), tmp_path)


def test_a_quick_check_is_not_a_source(tmp_path):
    _write_csv(tmp_path / "study/results.csv", [{**r, "quick_check": "--seeds 0"} for r in ROWS])
    with pytest.raises(docs_tables.DocsTableError, match="is a quick check"):
        docs_tables.regenerate(DOC, tmp_path)


def test_readme_benchmark_text_matches_the_script():
    script = (ROOT / "benchmarks/distillation_step_overhead.py").read_text()
    defaults = {
        name: int(value)
        for name, value in re.findall(r'"--(repeats|steps)", type=int, default=(\d+)', script)
    }
    readme = (ROOT / "README.md").read_text()
    [(repeats, steps)] = re.findall(r"(\d+) repeats x (\d+) steps", readme)
    assert (int(repeats), int(steps)) == (defaults["repeats"], defaults["steps"])
    [per_repeat] = re.findall(r"per-repeat ([\d. /]+);", readme)
    assert len(per_repeat.split(" / ")) == defaults["repeats"]


def test_method_pages_have_no_placeholders():
    for page in sorted((ROOT / "docs/methods").glob("*.md")):
        text = page.read_text()
        assert "Section owner" not in text and " go here" not in text, page.name


COMMON_ARGS = {"self", "num_classes", "optimizer", "lr_scheduler", "args", "kwargs"}


def test_data_free_page_names_every_argument():
    import inspect

    from kd_lightning.methods import DataFreeDistillation
    from kd_lightning.synthesis import DataImpressions, DeepInversion

    text = (ROOT / "docs/methods/data_free.md").read_text()
    for cls in (DataFreeDistillation, DeepInversion, DataImpressions):
        assert f"`{cls.__name__}`" in text or f".{cls.__name__}`" in text
        for name in inspect.signature(cls.__init__).parameters:
            if name not in COMMON_ARGS:
                assert f"`{name}" in text, f"{cls.__name__}.{name} is not in data_free.md"


@pytest.mark.parametrize("page", ["README.md", "docs/transformers.md"])
def test_causal_lm_perplexity_blocks_equal_their_committed_csv(page):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_table", ROOT / "experiments/text/lm_table.py")
    lm_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm_table)
    csv_file = ROOT / "experiments/text/results/lm/perplexity.csv"
    text = (ROOT / page).read_text()
    table = lm_table.markdown(lm_table.read_csv_rows(csv_file))
    rel = str(csv_file.relative_to(ROOT))
    assert lm_table.docs_block(text, rel, table) == text, f"run lm_table.py --docs {page}"
