"""SafeLoRA: the pure functions against a re-implementation of the official algorithm, and the callback on any model."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model

from guardspace_pl.callbacks import NullSpaceProjection, SafeLoRA
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.safelora import safelora_cosine, safelora_factors, select_modules
from guardspace_pl.safety_reference import AlignmentVector, SafetyReference
from guardspace_pl.testing import byte_tokenizer, tiny_llama
from tests.conftest import CALIBRATION_PROMPTS, UserModule, randomize_lora_B, trainer_kwargs


# ------------------------------------------------------------------------------- the official algorithm
def official_safelora(vectors, factors, mode, k=10, tau=0.5):
    """IBM/SafeLoRA model.py re-implemented on dense tensors: C = V V^T / ||V||; projected_weighted() always reads the
    ORIGINAL B (a deep copy of the model), rounds cosines to 5 decimals; number mode takes the K-th smallest cosine of
    a first pass as the threshold of a second."""
    projections = [v @ v.T / torch.norm(v) for v in vectors]

    def projected_weighted(threshold):
        new_B, cosines, distances = [], [], []
        for P, (A, B) in zip(projections, factors):
            W = torch.mm(P, B)
            cos = numpy.round(
                F.cosine_similarity(torch.mm(W, A).reshape(1, -1), torch.mm(B, A).reshape(1, -1)).item(), 5
            )
            cosines.append(cos)
            new = W if cos <= threshold else B
            new_B.append(new)
            distances.append((1 / (1 + torch.norm(new.reshape(1, -1) - W.reshape(1, -1)))).item())
        return new_B, cosines, float(numpy.mean(distances))

    if mode == "threshold":
        return projected_weighted(tau)
    _, cosines, _ = projected_weighted(0.3)
    return projected_weighted(numpy.sort(cosines)[:k][-1])


def peft_port_number_mode(vectors, factors, k, tau=0.5):
    """HF PEFT PR #2201 (src/peft/utils/safelora.py) number mode: the first pass writes its projections into the
    weights, the second pass copies THOSE as the originals, so selected modules can end up as C C B."""
    projections = [v @ v.T / torch.norm(v) for v in vectors]
    weights = [B.clone() for _, B in factors]

    def project(threshold):
        originals = [w.clone() for w in weights]
        cosines = []
        for i, (P, (A, _)) in enumerate(zip(projections, factors)):
            W = torch.mm(P, originals[i])
            cos = round(
                F.cosine_similarity(torch.mm(W, A).reshape(1, -1), torch.mm(originals[i], A).reshape(1, -1)).item(), 5
            )
            cosines.append(cos)
            weights[i] = W if cos <= threshold else originals[i]
        return cosines

    cosines = project(tau)
    project(sorted(cosines)[:k][-1])
    return weights


def random_modules(count=8, d_out=24, d_in=16, r=3, low_rank=None, seed=0):
    """Modules whose B A is more or less aligned with V: cosines spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    vectors, factors = [], []
    for i in range(count):
        rank_v = low_rank if low_rank is not None else min(d_out, d_in)
        left, right = torch.randn(d_out, rank_v, generator=g), torch.randn(rank_v, d_in, generator=g)
        v = left @ right
        u = torch.linalg.svd(v, full_matrices=False).U[:, :2]
        mix = i / (count - 1)
        B = mix * u @ torch.randn(2, r, generator=g) + (1 - mix) * torch.randn(d_out, r, generator=g)
        vectors.append((left, right))
        factors.append((torch.randn(r, d_in, generator=g), B))
    return vectors, factors


def ours(vectors, factors, factored=True, **settings):
    names = [f"m{i}" for i in range(len(factors))]
    refs = {
        n: AlignmentVector(left, right) if factored else AlignmentVector(left @ right)
        for n, (left, right) in zip(names, vectors)
    }
    new_B, report = safelora_factors(dict(zip(names, factors)), refs, **settings)
    return [new_B[n] for n in names], report


@pytest.mark.parametrize("low_rank", [None, 2], ids=["full-rank-V", "rank-2-V"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_number_mode_equals_the_official_algorithm(low_rank, k):
    vectors, factors = random_modules(low_rank=low_rank)
    expected, cosines, expected_pdst = official_safelora(
        [left @ right for left, right in vectors], factors, "number", k=k
    )
    got, report = ours(vectors, factors, factored=low_rank is not None, mode="number", num_projected_modules=k)
    assert len(report.projected_names) == k
    numpy.testing.assert_allclose([m.cosine for m in report.modules], cosines, atol=2e-5)
    for new, old in zip(got, expected):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    assert report.pdst == pytest.approx(expected_pdst, rel=1e-4)


@pytest.mark.parametrize("low_rank", [None, 2], ids=["full-rank-V", "rank-2-V"])
@pytest.mark.parametrize("tau", [-0.2, 0.3, 0.5, 0.8])
def test_threshold_mode_equals_the_official_algorithm(low_rank, tau):
    vectors, factors = random_modules(low_rank=low_rank, seed=1)
    expected, cosines, expected_pdst = official_safelora(
        [left @ right for left, right in vectors], factors, "threshold", tau=tau
    )
    got, report = ours(vectors, factors, factored=low_rank is not None, mode="threshold", threshold=tau)
    assert report.projected_names == {f"m{i}" for i, c in enumerate(cosines) if c <= tau}
    for new, old in zip(got, expected):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    assert report.pdst == pytest.approx(expected_pdst, rel=1e-4)


def test_the_peft_ports_double_projection_differs_and_ours_does_not():
    vectors, factors = random_modules(low_rank=2, seed=2)
    dense = [left @ right for left, right in vectors]
    official, cosines, _ = official_safelora(dense, factors, "number", k=3)
    assert sorted(cosines)[0] <= 0.5  # the PEFT port's first pass (tau = 0.5) already projects some modules
    port = peft_port_number_mode(dense, factors, k=3)
    got, _ = ours(vectors, factors, mode="number", num_projected_modules=3)
    changed = lambda result: [i for i, (_, B) in enumerate(factors) if not torch.allclose(result[i], B)]  # noqa: E731
    # The port's first pass (tau = 0.5) writes C B into the weights; the second pass reads those back as the
    # "originals", whose new cosine cos(C C B A, C B A) is high, so they stay projected: more than K modules end up
    # projected, the paper's K lowest plus every module below 0.5.
    assert len(changed(official)) == 3
    assert len(changed(port)) == sum(c <= 0.5 for c in cosines) > 3
    assert changed(got) == changed(official)
    for new, old in zip(got, official):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)


def test_low_rank_path_equals_the_dense_one():
    vectors, factors = random_modules(low_rank=3, d_out=48, seed=3)
    for projector in ("faithful", "orthonormal"):
        low, low_report = ours(
            vectors, factors, factored=True, mode="threshold", threshold=0.6, projector=projector, dtype="float64"
        )
        dense, dense_report = ours(
            vectors, factors, factored=False, mode="threshold", threshold=0.6, projector=projector, dtype="float64"
        )
        assert low_report.projected_names == dense_report.projected_names
        for a, b in zip(low, dense):  # the dense V = left @ right was rounded to float32 once
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (left, right), (A, B) in zip(vectors, factors):
        v = left.double() @ right.double()
        C = v @ v.T / v.norm()
        expected = F.cosine_similarity(
            (C @ B.double() @ A.double()).reshape(1, -1), (B.double() @ A.double()).reshape(1, -1)
        ).item()
        cosine = safelora_cosine(AlignmentVector(left.double(), right.double()), A.double(), B.double())
        assert cosine == pytest.approx(expected, abs=1e-10)


def test_orthonormal_projector_keeps_the_component_in_range_of_V():
    vectors, factors = random_modules(low_rank=2, seed=4)
    got, report = ours(vectors, factors, mode="number", num_projected_modules=len(factors), projector="orthonormal")
    for (left, right), (_, B), new in zip(vectors, factors, got):
        u = torch.linalg.svd(left @ right, full_matrices=False).U[:, :2]
        torch.testing.assert_close(new, u @ u.T @ B, rtol=1e-4, atol=1e-5)
    assert report.pdst == pytest.approx(1.0)


def test_modules_with_zero_alignment_vector_are_skipped_and_reported():
    vectors, factors = random_modules(count=5, low_rank=2, seed=5)
    vectors[1] = (torch.zeros_like(vectors[1][0]), vectors[1][1])
    got, report = ours(vectors, factors, mode="number", num_projected_modules=4)
    assert report.modules[1].skipped == "alignment vector V = 0" and report.modules[1].cosine is None
    assert len(report.projected_names) == 4 and "m1" not in report.projected_names
    torch.testing.assert_close(got[1], factors[1][1])
    with pytest.raises(ValueError, match=r"K\) = 5 but only 4 module"):
        ours(vectors, factors, mode="number", num_projected_modules=5)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        select_modules({"a": 0.1}, "threshold", threshold=1.5)
    with pytest.raises(ValueError, match="positive integer"):
        select_modules({"a": 0.1}, "number", num_projected_modules=0)
    with pytest.raises(ValueError, match=r"K\) = 3 but only 1"):
        select_modules({"a": 0.1}, "number", num_projected_modules=3)
    reference = SafetyReference(vectors={"x": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        SafeLoRA(reference, mode="threshold", threshold=-1.1)
    with pytest.raises(ValueError, match="mode must be one of"):
        SafeLoRA(reference, mode="lowest")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        SafeLoRA("/nonexistent/patch")


# --------------------------------------------------------------------------------------------- callback
class SnapshotLoraB(Callback):
    """Records every lora_B at fit end, before the callbacks listed after it run."""

    def on_fit_end(self, trainer, pl_module):
        self.lora = {
            t.hf_name: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for t in find_lora_targets(pl_module)
        }


def lora_model(seed=0, targets=("q_proj", "v_proj", "up_proj")):
    return get_peft_model(tiny_llama(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))


def make_patch(directory, targets=("q_proj", "v_proj", "up_proj")):
    patch = randomize_lora_B(lora_model(targets=targets), torch.Generator().manual_seed(7), scale=1.0)
    patch.save_pretrained(directory)
    return directory


def test_callback_on_a_user_lightning_module_after_null_space_projection(tmp_path):
    patch_dir = make_patch(tmp_path / "patch")
    module = UserModule(lora_model())
    snapshot = SnapshotLoraB()
    safelora = SafeLoRA(
        str(patch_dir), mode="number", num_projected_modules=2, report_path=str(tmp_path / "safelora.json")
    )
    null_space = NullSpaceProjection(
        CALIBRATION_PROMPTS, byte_tokenizer(), progress_bar=False, batch_size=2, threshold=0.05, threshold_mode="energy"
    )
    data = torch.utils.data.DataLoader(
        torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0)), batch_size=4
    )
    trainer = pl.Trainer(max_steps=4, callbacks=[null_space, snapshot, safelora], **trainer_kwargs(tmp_path))
    trainer.fit(module, data)

    report = json.loads((tmp_path / "safelora.json").read_text())
    assert report["num_projected"] == 2 and len(report["modules"]) == 6
    reference = SafetyReference.from_patch_adapter(patch_dir)
    expected_B, expected = safelora_factors(
        snapshot.lora, {n: reference.vector(n) for n in snapshot.lora}, num_projected_modules=2
    )
    assert {m["name"] for m in report["modules"] if m["projected"]} == expected.projected_names
    for target in find_lora_targets(module):
        torch.testing.assert_close(target.lora_B.detach(), expected_B[target.hf_name])
        changed = not torch.equal(target.lora_B.detach(), snapshot.lora[target.hf_name][1])
        assert changed == (target.hf_name in expected.projected_names)
    assert max(b.abs().max() for _, b in snapshot.lora.values()) > 1e-3  # training moved B


def test_callback_checks_the_reference_before_training(tmp_path):
    patch_dir = make_patch(tmp_path / "patch", targets=("q_proj",))
    module = UserModule(lora_model())
    data = torch.utils.data.DataLoader(torch.randint(0, 256, (4, 8)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=1, callbacks=[SafeLoRA(str(patch_dir), num_projected_modules=3)], **trainer_kwargs(tmp_path)
    )
    with (
        pytest.warns(UserWarning, match="does not cover 4 of 6"),
        pytest.raises(ValueError, match=r"K\) = 3 but the safety reference covers only 2"),
    ):
        trainer.fit(module, data)
    assert trainer.global_step == 0

    other = SafetyReference.from_patch_adapter(
        get_peft_model(tiny_llama(hidden_size=32, intermediate_size=64), LoraConfig(r=2, target_modules=["q_proj"]))
    )
    trainer = pl.Trainer(max_steps=1, callbacks=[SafeLoRA(other, num_projected_modules=1)], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"is \(32, 32\) in the reference but \(64, 64\) in the model"):
        trainer.fit(UserModule(lora_model(targets=("q_proj",))), data)


def test_an_identity_orthonormal_projector_is_reported_with_a_warning():
    g = torch.Generator().manual_seed(8)
    v = torch.randn(16, 24, generator=g)  # full row rank: range(V) is the whole output space
    factors = {"m": (torch.randn(3, 24, generator=g), torch.randn(16, 3, generator=g))}
    with pytest.warns(UserWarning, match="orthonormal projector is the identity for 1 selected module"):
        new_B, report = safelora_factors(
            factors, {"m": AlignmentVector(v)}, num_projected_modules=1, projector="orthonormal"
        )
    assert report.identity_projector == ["m"] and report.projected_names == {"m"}
    torch.testing.assert_close(new_B["m"], factors["m"][1], rtol=1e-5, atol=1e-5)
