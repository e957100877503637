"""The README's code examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"<!-- readme-example: ?([\w-]+)[^>]*-->\s*```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_its_examples():
    assert {name for name, _ in EXAMPLES} >= {"callbacks", "safelora"}, "the README lost an example"


# The README's examples use a plain Trainer as a reader would (default logger, default logging interval); Lightning's
# notes about TensorBoard not being installed and about logging less often than the 4 batches are expected there.
@pytest.mark.filterwarnings(
    "ignore:Starting from v1.9.0, `tensorboardX` has been removed", "ignore:The number of training batches"
)
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
