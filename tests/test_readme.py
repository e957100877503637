"""The README's code example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 8
    init, projection = trainer.callbacks[0], trainer.callbacks[1]
    assert init.initialized and projection.projectors
