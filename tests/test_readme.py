"""The README's code examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"<!-- readme-example: ?([\w-]+)[^>]*-->\s*```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_its_examples():
    assert {name for name, _ in EXAMPLES} >= {"callbacks", "safelora"}, "the README lost an example"


@pytest.mark.parametrize("name, code", EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_readme_example_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"{README}:{name}", "exec"), namespace)
    trainer = namespace["trainer"]
    if name == "callbacks":
        assert trainer.global_step == 8
        init, projection = trainer.callbacks[0], trainer.callbacks[1]
        assert init.initialized and projection.projectors
    if name == "safelora":
        report = namespace["safelora"].report
        assert report.summary() and len(report.projected_names) == 2
