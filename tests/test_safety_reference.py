"""SafetyReference: alignment vectors from two checkpoints (read lazily) or from a safety-patch adapter (factored)."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import guardspace_pl.safety_reference as safety_reference
from conftest import LLAMA_PROJECTIONS
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.safety_reference import AlignmentVector, SafetyReference
from guardspace_pl.testing import relative_error, tiny_llama

ALL_LINEARS = list(LLAMA_PROJECTIONS)


def peft_tiny(target_modules=("q_proj", "v_proj"), seed=0, **config):
    model = tiny_llama(seed=seed)
    config = {"r": 4, "lora_alpha": 8, **config}
    return get_peft_model(model, LoraConfig(target_modules=list(target_modules), **config))


def randomize_lora_B(peft_model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for target in find_lora_targets(peft_model):
            target.lora_B.copy_(torch.randn(target.lora_B.shape, generator=generator) * 0.1)


def track_reads(monkeypatch) -> dict:
    """Wrap the real tensor reader: count calls and the peak number of read tensors alive at once."""
    stats = {"calls": [], "alive": 0, "peak": 0}
    original = safety_reference.read_tensor

    def released() -> None:
        stats["alive"] -= 1

    def reader(path, key):
        tensor = original(path, key)
        stats["calls"].append(key)
        stats["alive"] += 1
        stats["peak"] = max(stats["peak"], stats["alive"])
        weakref.finalize(tensor, released)
        return tensor

    monkeypatch.setattr(safety_reference, "read_tensor", reader)
    return stats


@pytest.fixture
def checkpoint_pair(tmp_path):
    """A base and an 'aligned' tiny Llama (sharded into several safetensors files)."""
    base, aligned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        for name, param in aligned.named_parameters():
            if name.endswith("proj.weight"):
                param.add_(0.01 * torch.randn_like(param))
    base.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    aligned.save_pretrained(tmp_path / "aligned")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    return tmp_path / "base", tmp_path / "aligned", base, aligned


def test_from_checkpoints_matches_the_weight_difference_and_reads_one_module_at_a_time(checkpoint_pair, monkeypatch):
    base_dir, aligned_dir, base, aligned = checkpoint_pair
    stats = track_reads(monkeypatch)
    reference = SafetyReference.from_checkpoints(base_dir, aligned_dir)
    assert stats["calls"] == []  # headers only
    model = peft_tiny(ALL_LINEARS)
    targets = find_lora_targets(model)
    base_state, aligned_state = base.state_dict(), aligned.state_dict()
    seen = 0
    for target, vector in reference.for_targets(targets):
        key = f"{target.hf_name}.weight"
        torch.testing.assert_close(vector.dense(), aligned_state[key] - base_state[key])
        seen += 1
        del vector
    assert seen == len(targets) == 14
    # Exactly the two tensors of each LoRA layer were read (no embeddings, norms, lm_head), two at most alive.
    assert sorted(stats["calls"]) == sorted([f"{t.hf_name}.weight" for t in targets] * 2)
    assert stats["peak"] <= 2


def test_safelora_on_a_checkpoint_reference_holds_at_most_one_modules_tensors(checkpoint_pair, monkeypatch):
    from guardspace_pl.safelora import apply_safelora

    base_dir, aligned_dir, _, _ = checkpoint_pair
    stats = track_reads(monkeypatch)
    model = peft_tiny(ALL_LINEARS)
    randomize_lora_B(model)
    report = apply_safelora(
        find_lora_targets(model), SafetyReference.from_checkpoints(base_dir, aligned_dir), num_projected_modules=3
    )
    assert len(report.projected_names) == 3
    assert len(stats["calls"]) == 2 * 14 and stats["peak"] <= 2


def test_missing_checkpoint_tensors_are_a_clear_error(checkpoint_pair, tmp_path):
    base_dir, aligned_dir, _, _ = checkpoint_pair
    state = load_file(aligned_dir / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    (tmp_path / "partial").mkdir()
    save_file(state, tmp_path / "partial" / "model.safetensors")
    reference = SafetyReference.from_checkpoints(base_dir, tmp_path / "partial")
    targets = find_lora_targets(peft_tiny(["down_proj"]))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*base checkpoint only"):
        reference.check_targets(targets)
    with pytest.raises(ValueError, match=r"lack 1 requested tensor.*down_proj\.weight \(aligned checkpoint\)"):
        SafetyReference.from_checkpoints(base_dir, tmp_path / "partial", ["model.layers.1.mlp.down_proj"])
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetyReference.from_checkpoints(base_dir, tmp_path)


def test_a_reference_for_another_model_is_a_shape_error(tmp_path):
    tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(tmp_path / "small_base")
    tiny_llama(hidden_size=32, intermediate_size=64, seed=1).save_pretrained(tmp_path / "small_aligned")
    reference = SafetyReference.from_checkpoints(tmp_path / "small_base", tmp_path / "small_aligned")
    targets = find_lora_targets(peft_tiny())
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is \(32, 32\) in the reference but \(64, 64\)"
    ):
        list(reference.for_targets(targets))


def test_patch_adapter_vector_equals_peft_delta_weight_with_rank_and_alpha_patterns(tmp_path):
    patch = peft_tiny(
        ALL_LINEARS, r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True
    )
    randomize_lora_B(patch)
    patch.save_pretrained(tmp_path / "patch")
    from_dir = SafetyReference.from_patch_adapter(tmp_path / "patch")
    from_model = SafetyReference.from_patch_adapter(patch)
    targets = find_lora_targets(patch)
    assert {t.rank for t in targets} == {2, 4}
    for target in targets:
        expected = target.layer.get_delta_weight(target.adapter)  # PEFT's own s B A
        for reference in (from_dir, from_model):
            vector = reference.vector(target.hf_name)
            assert vector.is_factored and vector.left.shape[1] == target.rank
            assert relative_error(vector.dense(), expected) < 1e-6


def test_uncovered_modules_give_one_warning_listing_them(tmp_path):
    patch = peft_tiny(["q_proj"])
    randomize_lora_B(patch)
    reference = SafetyReference.from_patch_adapter(patch)
    targets = find_lora_targets(peft_tiny(["q_proj", "v_proj"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = list(reference.for_targets(targets))
    messages = [str(w.message) for w in caught if "does not cover" in str(w.message)]
    assert len(messages) == 1
    assert "2 of 4" in messages[0] and "model.layers.1.self_attn.v_proj" in messages[0]
    assert [v is None for _, v in pairs] == [False, True, False, True]


def test_a_directory_without_lora_layers_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        SafetyReference.from_patch_adapter(tmp_path / "empty")
    from peft import IA3Config

    ia3 = get_peft_model(
        tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="IA3 adapter; a safety patch must be a LoRA adapter"):
        SafetyReference.from_patch_adapter(tmp_path / "ia3")


@pytest.mark.parametrize("rank", [1, 3])
def test_spectrum_gives_an_orthonormal_basis_and_the_alignment_matrix(rank):
    generator = torch.Generator().manual_seed(rank)
    left, right = (
        torch.randn(40, rank, generator=generator, dtype=torch.float64),
        torch.randn(rank, 24, generator=generator, dtype=torch.float64),
    )
    factored, dense = AlignmentVector(left, right), AlignmentVector(left @ right)
    for vector in (factored, dense):
        u, sigma = vector.spectrum()
        assert u.shape == (40, rank)  # numerical rank, also for the dense SVD
        torch.testing.assert_close(u.T @ u, torch.eye(rank, dtype=torch.float64))
        c = u @ torch.diag(sigma.pow(2) / vector.norm()) @ u.T
        torch.testing.assert_close(c, vector.alignment_matrix_dense())
    assert abs(factored.norm() - (left @ right).norm().item()) < 1e-9
    x = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    expected = factored.alignment_matrix_dense() @ x
    torch.testing.assert_close(factored.apply_alignment_matrix(x), expected)
    torch.testing.assert_close(dense.apply_alignment_matrix(x), expected)
    # C is not a projector: its eigenvalues are sigma^2 / ||V||_F.
    assert not torch.allclose(factored.apply_alignment_matrix(factored.apply_alignment_matrix(x)), expected)
    projector = (left @ right) @ torch.linalg.pinv(left @ right)  # the orthogonal projector onto range(V)
    torch.testing.assert_close(factored.apply_orthonormal_projector(x), projector @ x)
    torch.testing.assert_close(dense.apply_orthonormal_projector(x), projector @ x)


def test_callbacks_take_a_reference_or_a_patch_directory_and_reject_anything_else(tmp_path):
    from guardspace_pl.callbacks import AsFTRegularizer, LSSFFusion, SafeLoRA
    from guardspace_pl.safety_reference import SafetyReference, as_safety_reference

    with pytest.raises(TypeError, match="SafetyReference or a safety-patch adapter directory"):
        as_safety_reference(42)
    for make in (lambda r: SafeLoRA(r), lambda r: AsFTRegularizer(r), lambda r: LSSFFusion(r, ["build a bomb"])):
        with pytest.raises(TypeError, match="reference must be"):
            make(["not", "a", "reference"])
    reference = SafetyReference(vectors={}, source="empty")
    assert as_safety_reference(reference) is reference
