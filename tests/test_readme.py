"""README examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_blocks()[index], f"README.md block {index}", "exec"), namespace)  # noqa: S102
    if "probabilities" in namespace:
        assert namespace["probabilities"].shape == (1, 10)
        assert (tmp_path / "student.ckpt").is_file()


def test_readme_commands_exist():
    text = README.read_text()
    assert "make study" in text and "make test" in text
    makefile = (README.parent / "Makefile").read_text()
    assert "kd-lightning study experiments/digits/study_core.yaml" in makefile
    assert "study_core.yaml" in text
