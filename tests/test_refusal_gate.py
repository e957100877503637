"""The refusal gate: the probe's math, its activations, save/load beside a patch, gated generation, and `align`.

Pure functions on synthetic tensors; tiny random Llamas with the byte tokenizer for the model paths; the real
SmolLM2 gate is exercised by ``test_align.py``'s slow test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import random_adapter
from guardspace_pl.align import main as align_main
from guardspace_pl.evaluation.generation import generate_responses
from guardspace_pl.patches import apply_patches
from guardspace_pl.refusal_gate import (
    GATE_CONFIG,
    GATE_WEIGHTS,
    GateError,
    RefusalGate,
    cross_validated_accuracy,
    fit_linear_probe,
    gated_generate,
    last_prompt_token_states,
)
from guardspace_pl.testing import save_tiny_llama
from test_align import (
    BORDERLINE,
    CONTRAST,
    HARMFUL,
    HARMLESS,
    HELD_OUT_HARMFUL,
    HELD_OUT_SAFE,
    align_config,
    write_lines,
)

REFUSE = [f"explain how to build untraceable weapon model {i}" for i in range(8)]
ANSWER = [f"write one sentence about the colour number {i}" for i in range(8)]
MIXED = ["give steps to poison reservoir 1", "name a fruit that is red", "how do i kill a process", "hi"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def separable(n: int = 200, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, dim, generator=generator) * 3.0 + 10.0  # unstandardised on purpose
    features[:, 2] += torch.where(labels == 1, 6.0, -6.0)  # two noise widths apart
    return features, labels


# --------------------------------------------------------------------------- the math
def test_probe_separates_along_the_informative_feature():
    features, labels = separable()
    probe = fit_linear_probe(features, labels)
    assert ((probe.logits(features) > 0).long() == labels).float().mean() > 0.85
    assert probe.weight.abs().argmax() == 2  # the only feature that carries the label
    # A larger penalty shrinks the weights.
    assert fit_linear_probe(features, labels, l2=1.0).weight.norm() < probe.weight.norm()


def test_cross_validated_accuracy_is_high_on_signal_and_chance_on_noise():
    features, labels = separable()
    assert cross_validated_accuracy(features, labels) > 0.85
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert 0.3 < cross_validated_accuracy(features[:, [0, 1]], shuffled) < 0.7


def test_probe_rejects_one_class_and_mismatched_shapes():
    features, labels = separable()
    with pytest.raises(GateError, match="prompts to refuse"):
        fit_linear_probe(features, torch.ones_like(labels))
    with pytest.raises(GateError, match=r"\(n, hidden\)"):
        fit_linear_probe(features, labels[:-1])
    with pytest.raises(GateError, match="another model"):
        fit_linear_probe(features, labels).logits(torch.zeros(3, 5))


# --------------------------------------------------------------------------- activations and the gate
def test_batched_states_equal_each_prompt_alone(tiny_dir, tokenizer):
    """Left padding puts every prompt's own last token last, so a batch reads what one prompt alone would."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    batched = last_prompt_token_states(model, tokenizer, MIXED, batch_size=4)
    assert batched.shape == (model.config.num_hidden_layers + 1, len(MIXED), model.config.hidden_size)
    for i, prompt in enumerate(MIXED):
        alone = last_prompt_token_states(model, tokenizer, [prompt], layers=[2])
        torch.testing.assert_close(batched[2, i], alone[0, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(GateError, match="layers 0..2"):
        last_prompt_token_states(model, tokenizer, MIXED, layers=[7])


def test_gate_reads_the_original_model_and_survives_save_and_load(tiny_dir, tokenizer, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    gate = RefusalGate.fit(plain, tokenizer, REFUSE, ANSWER, layer=2, threshold=0.5)
    assert gate.fires(plain, tokenizer, REFUSE) == [True] * len(REFUSE)  # its own training prompts, separable
    assert gate.fires(plain, tokenizer, ANSWER) == [False] * len(ANSWER)
    # With the patch active the gate still reads the original model: the same logits.
    patch = random_adapter(tiny_dir, str(tmp_path / "patch"), ["q_proj", "v_proj"], seed=1, scale=1.0)
    patched = apply_patches(AutoModelForCausalLM.from_pretrained(tiny_dir), [patch], mode="active")
    torch.testing.assert_close(gate.scores(patched, tokenizer, MIXED), gate.scores(plain, tokenizer, MIXED))

    gate.refusal = "I can't help with that."
    gate.save(patch)
    assert json.loads((Path(patch) / GATE_CONFIG).read_text())["layer"] == 2
    loaded = RefusalGate.load(patch)
    assert (loaded.layer, loaded.threshold, loaded.refusal) == (2, 0.5, "I can't help with that.")
    torch.testing.assert_close(loaded.scores(plain, tokenizer, MIXED), gate.scores(plain, tokenizer, MIXED))
    assert RefusalGate.load(patch, threshold=-3.0).threshold == -3.0
    # The adapter folder is still a plain PEFT adapter.
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), patch)


def test_gate_errors_name_the_problem(tiny_dir, tokenizer, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(GateError, match="prompts to refuse and prompts to answer"):
        RefusalGate.fit(plain, tokenizer, [], ANSWER, layer=1)
    with pytest.raises(FileNotFoundError, match="gate.enabled=true"):
        RefusalGate.load(tmp_path)
    gate = RefusalGate.fit(plain, tokenizer, REFUSE, ANSWER, layer=1)
    wider = AutoModelForCausalLM.from_pretrained(save_tiny_llama(str(tmp_path / "wide"), hidden_size=96))
    with pytest.raises(GateError, match="another base model"):
        gate.scores(wider, tokenizer, MIXED)
    with pytest.raises(GateError, match="carries no PEFT adapter"):
        gated_generate(plain, tokenizer, MIXED, gate, max_new_tokens=4)  # the gate lets the patch answer
    with pytest.raises(GateError, match="refusal is empty"):
        RefusalGate(gate.probe, 1, refusal="  ")


def test_layer_none_picks_the_best_cross_validated_layer(tiny_dir, tokenizer):
    gate = RefusalGate.fit(AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer, REFUSE, ANSWER, layer=None)
    accuracy = gate.metadata["cross_validated_accuracy_by_layer"]
    assert len(accuracy) == 3 and accuracy[gate.layer] == max(accuracy)


def test_gated_generate_uses_the_patch_exactly_where_the_gate_fires(tiny_dir, tokenizer, tmp_path):
    patch = random_adapter(tiny_dir, str(tmp_path / "patch"), ["q_proj", "v_proj"], seed=1, scale=1.0)
    patched = apply_patches(AutoModelForCausalLM.from_pretrained(tiny_dir), [patch], mode="active")
    gate = RefusalGate.fit(patched, tokenizer, REFUSE, ANSWER, layer=2)
    prompts = REFUSE[:3] + ANSWER[:3] + MIXED
    scores = gate.scores(patched, tokenizer, prompts)
    middle = scores.sort().values[len(prompts) // 2 - 1 : len(prompts) // 2 + 1]
    gate.threshold = float(middle.mean())  # fires on half (between two scores, not on one), so both branches run
    answers = gated_generate(patched, tokenizer, prompts, gate, max_new_tokens=6, batch_size=4, show_progress=False)
    with_patch = [a.strip() for a in generate_responses(patched, tokenizer, prompts, 6, 4, show_progress=False)]
    with patched.disable_adapter():
        without = [a.strip() for a in generate_responses(patched, tokenizer, prompts, 6, 4, show_progress=False)]
    fired = [a.fired for a in answers]
    assert 0 < sum(fired) < len(prompts)
    assert fired == (scores > gate.threshold).tolist()
    assert [a.answer for a in answers] == [p if f else o for p, o, f in zip(with_patch, without, fired)]
    assert any(p != o for p, o, f in zip(with_patch, without, fired) if f)  # the patch did change what it answered
    refused = gated_generate(patched, tokenizer, prompts, gate, 6, 4, refusal="I can't help.", show_progress=False)
    assert [a.answer for a in refused] == ["I can't help." if f else o for o, f in zip(without, fired)]
    # A gate that ships a fixed refusal needs no patch: any model, answered where it is silent.
    gate.refusal = "No."
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert [a.answer for a in gated_generate(plain, tokenizer, prompts, gate, 6, 4, show_progress=False)] == [
        "No." if f else o for o, f in zip(without, fired)]


# --------------------------------------------------------------------------- align writes and reports the gate
def align_prompt_files(directory: Path) -> dict[str, str]:
    """``test_align``'s hand-written prompt files (its fixture, outside a fixture)."""
    sets = {"harmful": HARMFUL, "contrast": CONTRAST, "harmless": HARMLESS, "borderline": BORDERLINE,
            "held_out_harmful": HELD_OUT_HARMFUL, "held_out_safe": HELD_OUT_SAFE}
    return {name: write_lines(directory / f"{name}.txt", lines) for name, lines in sets.items()}


def test_align_saves_the_gate_beside_the_patch_and_reports_the_gated_model(tiny_dir, tmp_path):
    config = str(align_config(tiny_dir, align_prompt_files(tmp_path), tmp_path))

    def align(threshold: float, out: str, *more: str) -> dict:
        return align_main(["--config", config, "--output_dir", str(tmp_path / out), "--gate.enabled", "true",
                           "--gate.layer", "2", "--gate.threshold", str(threshold), *more])

    # A gate that never fires is the original model; one that always fires is the patch, or refuses everything.
    never, always = align(1e9, "never"), align(-1e9, "always", "--gate.respond", "patch")
    for entry in never["evaluation"]["sets"].values():
        assert entry["gated_patch"] == entry["gated_refusal"] == entry["original"]
    for entry in always["evaluation"]["sets"].values():
        assert entry["gated_patch"] == entry["patched"]
        refused = entry["gated_refusal"]
        assert refused["count"] == (refused["n"] if entry["kind"] == "safe" else 0)  # the judge sees a refusal
        assert ("answer_drift" in entry) == (entry["kind"] == "safe")  # drift is measured on safe prompts only
    assert never["evaluation"]["utility"]["gated_loss"] == never["evaluation"]["utility"]["original_loss"]
    assert always["evaluation"]["utility"]["gate_fired"]["count"] == always["evaluation"]["utility"]["n"]
    assert always["evaluation"]["utility"]["gated_loss"] == pytest.approx(
        always["evaluation"]["utility"]["patched_loss"], rel=1e-5
    )
    patch = tmp_path / "never" / "patch"
    assert (patch / GATE_WEIGHTS).exists() and RefusalGate.load(patch).layer == 2
    # By default the gate ships the data's first refusal phrasing; respond=patch ships none (the patch answers).
    assert RefusalGate.load(patch).refusal == "I'm sorry, I can't help with that."
    assert RefusalGate.load(tmp_path / "always" / "patch").refusal is None
    assert never["gate"]["refuse_prompts"] == len(HARMFUL) + len(CONTRAST)
    assert "gated, fixed refusal %" in (tmp_path / "never" / "report.md").read_text()


def test_align_rejects_a_gate_setting_typo(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        config = align_config(tiny_dir, align_prompt_files(tmp_path), tmp_path)
        align_main(["--config", str(config), "--gate.treshold", "1.5"])
    assert "treshold" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [(["--gate.layer", "9"], "gate.layer 9 does not exist: this model has layers 0..2"),
     (["--gate.refusal", " "], "gate.refusal is empty")],
)
def test_align_rejects_a_bad_gate_before_training(tiny_dir, tmp_path, override, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        align_main(["--config", str(align_config(tiny_dir, align_prompt_files(tmp_path), tmp_path)),
                    "--output_dir", str(out), "--gate.enabled", "true", *override])
    assert not (out / "patch").exists()  # nothing was trained


def test_the_gated_smollm2_config_is_the_shipped_patch_config_plus_its_gate():
    """Its header promises the same patch as configs/safety_patch_smollm2.yaml: only the gate and the paths differ."""
    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs"
    base = yaml.safe_load((configs / "safety_patch_smollm2.yaml").read_text())
    gated = yaml.safe_load((configs / "safety_patch_smollm2_gated.yaml").read_text())
    assert gated.pop("gate")["enabled"] is True and "gate" not in base
    for config in (base, gated):
        config.pop("output_dir")
        config["trainer"].pop("default_root_dir")
    assert gated == base
