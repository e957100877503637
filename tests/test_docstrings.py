"""Docstrings are the CLI's help: jsonargparse builds ``--help`` from Google-style ``Args:`` sections, one entry per
argument. A lumped entry (``a, b: ...``) or a missing one leaves arguments without help, or breaks the parser."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from docstring_parser import DocstringStyle, parse

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("guardspace_pl", "guardspace_pl.callbacks", "guardspace_pl.datamodules")


def exported(package: str) -> list[tuple[str, object]]:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
    return [(f"{package}.{name}", getattr(module, name)) for name in names]


def constructor_parameters(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(target).parameters.values() if p.name != "self" and p.kind not in skip]


def documented_arguments(obj) -> list[str]:
    docs = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj) and "__init__" in vars(obj):
        docs.append(inspect.cleandoc(vars(obj)["__init__"].__doc__ or ""))  # its own, not an inherited one
    names: list[str] = []
    for doc in docs:
        names += [p.arg_name for p in parse(doc, style=DocstringStyle.GOOGLE).params if p.args[0] == "param"]
    return names


def has_args_section(obj) -> bool:
    return re.search(r"^\s*Args:\s*$", inspect.getdoc(obj) or "", re.M) is not None


def checked_objects() -> list[tuple[str, object]]:
    """Public classes with their own constructor, and public functions whose docstring has an Args section."""
    found: dict[str, object] = {}
    for package in PACKAGES:
        for name, obj in exported(package):
            if inspect.isclass(obj):
                own_init = "__init__" in vars(obj) and not dataclasses.is_dataclass(obj)
                if own_init and obj.__module__.startswith("guardspace_pl"):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
            elif inspect.isfunction(obj) and has_args_section(obj):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return sorted(found.items())


CHECKED = checked_objects()


def test_the_check_covers_the_main_classes():
    names = {name.rsplit(".", 1)[-1] for name, _ in CHECKED}
    assert {"GuardSpaceLM", "GuardSpaceDataModule", "SafetySubspaceInit", "NullSpaceProjection"} <= names


@pytest.mark.parametrize("name, obj", CHECKED, ids=[name for name, _ in CHECKED])
def test_documented_arguments_equal_the_signature(name, obj):
    documented = documented_arguments(obj)
    lumped = [d for d in documented if "," in d or "/" in d or " " in d]
    assert not lumped, f"{name}: one Args entry per argument, not {lumped}"
    duplicated = sorted({d for d in documented if documented.count(d) > 1})
    assert not duplicated, f"{name}: documented twice: {duplicated}"
    parameters = constructor_parameters(obj)
    assert set(documented) == set(parameters), (
        f"{name}: undocumented {sorted(set(parameters) - set(documented))}, "
        f"documented but not in the signature {sorted(set(documented) - set(parameters))}"
    )


@pytest.mark.parametrize("callback", ["SafetySubspaceInit", "NullSpaceProjection"])
def test_cli_help_describes_every_callback_argument(callback):
    cls = getattr(importlib.import_module("guardspace_pl.callbacks"), callback)
    proc = subprocess.run(
        [sys.executable, "-m", "guardspace_pl", "fit", "--trainer.callbacks.help",
         f"guardspace_pl.callbacks.{callback}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Each option's block: "--trainer.callbacks.<name> ..." then its help text, then "(type: ..., default: ...)".
    blocks = re.split(r"\n  --trainer\.callbacks\.", proc.stdout)[1:]
    helps = {}
    for block in blocks:
        head, _, rest = block.partition("\n")
        text = rest.split("(type:")[0] if "(type:" in rest else ""
        helps[head.split()[0]] = " ".join(text.split())
    missing = [p for p in constructor_parameters(cls) if not helps.get(p)]
    assert not missing, f"--trainer.callbacks.help {callback} prints no help text for {missing}"
