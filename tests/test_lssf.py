"""LSSF: the entropy rank, the weighted projector and the fusion against the paper's formula; the callback on any
model; ``repair --method lssf``."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from guardspace_pl.callbacks import LSSFFusion, NullSpaceProjection
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.lssf import (
    adapters_disabled,
    anchor_spectrum,
    anchor_token_ids,
    apply_lssf,
    check_lssf_settings,
    collect_anchor_covariances,
    covariance_root,
    entropy_rank,
    lssf_fold,
    lssf_fused_weight,
    projector_weights,
)
from guardspace_pl.repair import main
from guardspace_pl.safety_reference import AlignmentVector, SafetyReference
from guardspace_pl.testing import byte_tokenizer, relative_error, save_tiny_llama, tiny_llama
from tests.conftest import (
    CALIBRATION_PROMPTS,
    UserModule,
    logits,
    random_adapter,
    randomize_lora_B,
    train_chat_lora,
    trainer_kwargs,
)

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ entropy rank
def test_entropy_rank_on_spectra_with_a_known_answer():
    # p = (1/2, 1/4, 1/4): each term p log(1/p) is ln(2)/2, so H(rho)/H(full) = rho/3.
    sigma = torch.tensor([0.5, 0.25, 0.25]).sqrt()
    assert entropy_rank(sigma, 0.3) == (1, pytest.approx(1 / 3))
    assert entropy_rank(sigma, 0.6) == (2, pytest.approx(2 / 3))
    assert entropy_rank(sigma, 0.9) == (3, pytest.approx(1.0))
    # A flat spectrum of n values: H(rho)/H(full) = rho/n, so r = ceil(eta n).
    for n, eta in [(10, 0.9), (10, 0.85), (7, 0.5), (4, 1.0)]:
        assert entropy_rank(torch.ones(n) * 3.0, eta)[0] == math.ceil(eta * n - 1e-9)
    # The rule on a direct computation for a generic spectrum.
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    p = sigma**2 / (sigma**2).sum()
    terms = -(p * p.log())
    ratios = terms.cumsum(0) / terms.sum()
    for eta in (0.5, 0.8, 0.9, 0.95, 0.99):
        expected = next(i + 1 for i, r in enumerate(ratios.tolist()) if r >= eta)
        rho, ratio = entropy_rank(sigma, eta)
        assert rho == expected and ratio >= eta and (rho == 1 or ratios[rho - 2] < eta)


def test_entropy_rank_edge_cases():
    assert entropy_rank(torch.tensor([4.0, 0.0, 0.0]), 0.9) == (1, 1.0)  # one direction: H(full) = 0
    assert entropy_rank(torch.zeros(3), 0.9) == (0, 0.0)  # nothing to project onto
    assert entropy_rank(torch.zeros(0), 0.9) == (0, 0.0)
    assert entropy_rank(torch.tensor([2.0, 1.0, 0.0, 0.0]), 1.0)[0] == 2  # eta = 1 stops at the last non-zero value
    with pytest.raises(ValueError, match="decreasing"):
        entropy_rank(torch.tensor([1.0, 2.0]), 0.9)
    for eta in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="eta"):
            entropy_rank(torch.ones(3), eta)


def test_projector_weights():
    torch.testing.assert_close(
        projector_weights(torch.tensor([4.0, 3.0, 2.0]), 3.0), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        projector_weights(torch.tensor([4.0, 3.5, 2.0]), 1.0), torch.ones(3, dtype=torch.float64)
    )
    # 0/0: all 1
    torch.testing.assert_close(projector_weights(torch.tensor([4.0]), 5.0), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(projector_weights(torch.tensor([2.0, 2.0]), 5.0), torch.ones(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- fusion
def layer(d_out=12, d_in=10, tokens=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    # Anisotropic inputs so that the spectrum is spread and r_l is strictly between 1 and d.
    scales = torch.logspace(0, -1.5, d_in, dtype=torch.float64)
    inputs = torch.diag(scales) @ torch.randn(d_in, tokens, generator=g, dtype=torch.float64)
    return weight, inputs, g


def test_covariance_root_spectrum_equals_the_svd_of_w_times_x_hat():
    weight, inputs, _ = layer()
    x_hat = inputs / math.sqrt(inputs.shape[1])
    covariance = x_hat @ x_hat.T
    for w in (weight, weight[:8], weight[:10]):  # d_out > d_in (root of C); d_out < d_in and square (W C W^T)
        u_ref, sigma_ref, _ = torch.linalg.svd(w @ x_hat, full_matrices=False)
        for u, sigma in (anchor_spectrum(w, covariance), anchor_spectrum(w, root=covariance_root(covariance))):
            torch.testing.assert_close(sigma[:6], sigma_ref[:6])
            for r in (1, 3, 6):  # the subspaces agree (the vectors' signs may not)
                torch.testing.assert_close(u[:, :r] @ u[:, :r].T, u_ref[:, :r] @ u_ref[:, :r].T)
    # Fewer tokens than inputs: the root drops the null directions and keeps the spectrum.
    few = inputs[:, :4] / 2
    root = covariance_root(few @ few.T)
    assert root.shape[1] == 4
    torch.testing.assert_close(anchor_spectrum(weight, root=root)[1], torch.linalg.svdvals(weight @ few))


@pytest.mark.parametrize("a1", [1.0, 2.5])
@pytest.mark.parametrize("eta", [0.5, 0.9])
@pytest.mark.parametrize("delta_rank", [2, 9])  # below and above r_l: both factored branches
def test_fold_equals_the_formula_and_factored_equals_dense(a1, eta, delta_rank):
    weight, inputs, g = layer()
    weight_ft = weight + 0.1 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
    left, right = (
        torch.randn(12, delta_rank, generator=g, dtype=torch.float64),
        torch.randn(delta_rank, 10, generator=g, dtype=torch.float64),
    )
    delta = left @ right
    x_hat = inputs / math.sqrt(inputs.shape[1])
    covariance = x_hat @ x_hat.T
    expected = lssf_fused_weight(weight_ft, weight, inputs, delta, alpha=1.5, eta=eta, a1=a1)
    factored = lssf_fold(weight, covariance, AlignmentVector(left, right), 1.5, eta, a1)
    dense = lssf_fold(weight, None, AlignmentVector(delta), 1.5, eta, a1, root=covariance_root(covariance))
    assert 1 < factored.rank < 10 and factored.rank == dense.rank
    assert factored.inner_rank == min(factored.rank, delta_rank)
    torch.testing.assert_close(weight_ft + factored.dense(), expected)
    torch.testing.assert_close(weight_ft + dense.dense(), expected)
    assert factored.norm() == pytest.approx(factored.dense().norm().item(), rel=1e-9)
    assert factored.entropy_ratio >= eta


def test_alpha_zero_is_the_identity():
    weight, inputs, _ = layer()
    fold = lssf_fold(
        weight,
        inputs @ inputs.T,
        AlignmentVector(torch.randn(12, 2, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)),
        alpha=0.0,
    )
    assert torch.count_nonzero(fold.dense()) == 0


def test_bad_settings_are_clear_errors(tmp_path):
    for kwargs, match in [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"eta": 0.0}, "eta"),
        ({"eta": 1.2}, "eta"),
        ({"a1": 0.0}, "a1"),
        ({"module_pattern": "("}, "module_pattern"),
    ]:
        settings = {"alpha": 1.0, "eta": 0.9, **kwargs}
        with pytest.raises(ValueError, match=match):
            check_lssf_settings(**settings)
    reference = SafetyReference({"model.layers.0.self_attn.q_proj": torch.ones(64, 64)})
    with pytest.raises(ValueError, match="alpha"):
        LSSFFusion(reference, CALIBRATION_PROMPTS, alpha=-1.0)
    with pytest.raises(ValueError, match="eta"):
        LSSFFusion(reference, CALIBRATION_PROMPTS, eta=1.5)
    with pytest.raises(ValueError, match="empty"):
        LSSFFusion(reference, [])
    model = lora_model()
    with pytest.raises(ValueError, match="at least one"):
        collect_anchor_covariances(model, find_lora_targets(model), byte_tokenizer(), [])


# -------------------------------------------------------------------------------------------------- model
def lora_model(seed=0, targets=("q_proj", "v_proj", "up_proj"), random_B=False):
    model = get_peft_model(tiny_llama(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    return randomize_lora_B(model, torch.Generator().manual_seed(seed + 100)) if random_B else model


def patch_reference(targets=("q_proj", "v_proj", "up_proj")):
    return SafetyReference.from_patch_adapter(lora_model(seed=3, targets=targets, random_B=True))


def layer_inputs(model, targets, token_ids):
    """Each layer's anchor inputs X (d_in x tokens), hooked directly, with the adapters bypassed."""
    inputs = {t.name: [] for t in targets}
    hooks = [
        t.layer.register_forward_pre_hook(lambda m, a, n=t.name: inputs[n].append(a[0][0].detach().T)) for t in targets
    ]
    with adapters_disabled(targets), torch.no_grad():
        for ids in token_ids:
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(x, 1) for n, x in inputs.items()}


def test_the_anchor_model_is_the_model_before_fine_tuning():
    model = lora_model(random_B=True)
    targets = find_lora_targets(model)
    with model.disable_adapter():
        before_fine_tuning = logits(model, IDS)
    fine_tuned = logits(model, IDS)
    with adapters_disabled(targets):
        torch.testing.assert_close(logits(model, IDS), before_fine_tuning)
    assert relative_error(fine_tuned, before_fine_tuning) > 1e-4
    torch.testing.assert_close(logits(model, IDS), fine_tuned)  # enabled again after
    assert all(t.lora_A.requires_grad and t.lora_B.requires_grad for t in targets)


def test_apply_lssf_fuses_the_formula_into_the_frozen_weights():
    model = lora_model(random_B=True)
    tokenizer = byte_tokenizer()
    targets = find_lora_targets(model)
    reference = patch_reference(targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    before = {
        t.name: (t.base.weight.detach().clone(), t.lora_A.detach().clone(), t.lora_B.detach().clone()) for t in targets
    }
    covariances, responses = collect_anchor_covariances(
        model, targets, tokenizer, CALIBRATION_PROMPTS, max_new_tokens=6, batch_size=2
    )
    assert len(responses) == len(CALIBRATION_PROMPTS)
    assert (
        covariances["base_model.model.model.layers.0.self_attn.q_proj"]
        is covariances["base_model.model.model.layers.0.self_attn.v_proj"]
    )
    inputs = layer_inputs(model, targets, anchor_token_ids(tokenizer, CALIBRATION_PROMPTS, responses))
    report = apply_lssf(targets, reference, covariances, alpha=1.0, eta=0.9, num_anchor_prompts=4)
    assert len(report.fused_names) == 6 and not report.skipped_names
    for t, module in zip(targets, report.modules):
        w0, a, b = before[t.name]
        expected = lssf_fused_weight(w0, w0, inputs[t.name], reference.vector(t.hf_name).dense(), 1.0, 0.9)
        torch.testing.assert_close(t.base.weight.detach().double(), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(t.lora_A, a) and torch.equal(t.lora_B, b)  # only the frozen weight changes
        assert module.fold_norm == pytest.approx(
            (t.base.weight.detach().double() - w0.double()).norm().item(), rel=1e-4
        )
        assert 1 <= module.rank <= module.num_singular_values and module.entropy_ratio >= 0.9
    assert not any(p.requires_grad for t in targets for p in (t.base.weight,))
    assert all(t.lora_A.requires_grad for t in targets)  # adapters_disabled restored the flags


def test_block_by_block_fusion_equals_all_at_once_with_one_blocks_covariances_alive(monkeypatch):
    import guardspace_pl.calibration as calibration
    from guardspace_pl.lssf import fuse_lssf_by_block

    tokenizer = byte_tokenizer()
    reference = patch_reference(targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    at_once, by_block = lora_model(random_B=True), lora_model(random_B=True)
    targets = find_lora_targets(at_once)
    covariances, responses = collect_anchor_covariances(
        at_once, targets, tokenizer, CALIBRATION_PROMPTS, max_new_tokens=6, batch_size=2
    )
    expected = apply_lssf(targets, reference, covariances, alpha=1.0, eta=0.9, num_anchor_prompts=4)

    real, calls = calibration.collect_covariances, []

    def one_block_only(model, layers, *args, **kwargs):
        calls.append({t.name.split(".layers.")[1].split(".")[0] for t in layers})
        return real(model, layers, *args, **kwargs)

    monkeypatch.setattr(calibration, "collect_covariances", one_block_only)
    block_targets = find_lora_targets(by_block)
    report, block_responses = fuse_lssf_by_block(
        by_block,
        block_targets,
        reference,
        tokenizer,
        CALIBRATION_PROMPTS,
        alpha=1.0,
        eta=0.9,
        max_new_tokens=6,
        batch_size=2,
    )
    assert calls == [{"1"}, {"0"}]  # the last block first, one block per anchor forward
    assert block_responses == responses and report.fused_names == expected.fused_names
    for a, b in zip(targets, block_targets):
        torch.testing.assert_close(b.base.weight, a.base.weight, rtol=1e-5, atol=1e-6)
    assert [m.rank for m in report.modules] == [m.rank for m in expected.modules]


def test_alpha_zero_leaves_the_model_unchanged_and_a_partial_reference_warns():
    model = lora_model(random_B=True)
    targets = find_lora_targets(model)
    covariances, _ = collect_anchor_covariances(
        model, targets, byte_tokenizer(), CALIBRATION_PROMPTS[:2], max_new_tokens=4
    )
    reference = patch_reference(targets=("q_proj", "up_proj"))  # lacks v_proj
    before = logits(model, IDS)
    with pytest.warns(UserWarning) as caught:
        report = apply_lssf(targets, reference, covariances, alpha=0.0)
    messages = " ".join(str(w.message) for w in caught)
    assert (
        "does not cover 2 of 6" in messages
        and "model.layers.0.self_attn.v_proj" in messages
        and "alpha = 0" in messages
    )
    assert sorted(report.skipped_names) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert torch.equal(logits(model, IDS), before)


def test_missing_covariances_or_no_matching_layer_are_errors_before_any_write():
    model = lora_model(random_B=True)
    targets = find_lora_targets(model)
    covariances, _ = collect_anchor_covariances(
        model, targets, byte_tokenizer(), CALIBRATION_PROMPTS[:2], max_new_tokens=4
    )
    before = logits(model, IDS)
    del covariances[targets[-1].name]
    with pytest.raises(ValueError, match="No anchor covariance"):
        apply_lssf(targets, patch_reference(), covariances)
    with pytest.raises(ValueError, match="module_pattern"):
        apply_lssf(targets, patch_reference(), covariances, module_pattern=r"\.lm_head\.")
    assert torch.equal(logits(model, IDS), before)


class Snapshot(Callback):
    """Records the frozen weights and factors at fit end, before the callbacks listed after it run."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {
            t.hf_name: [x.detach().clone() for x in (t.base.weight, t.lora_A, t.lora_B)]
            for t in find_lora_targets(pl_module)
        }


def test_callback_on_a_user_lightning_module_after_null_space_projection(tmp_path):
    module = UserModule(lora_model())
    snapshot = Snapshot()
    null_space = NullSpaceProjection(
        CALIBRATION_PROMPTS, byte_tokenizer(), progress_bar=False, batch_size=2, threshold=0.05, threshold_mode="energy"
    )
    lssf = LSSFFusion(
        patch_reference(),
        CALIBRATION_PROMPTS,
        tokenizer=byte_tokenizer(),
        max_new_tokens=6,
        report_path=str(tmp_path / "lssf.json"),
    )
    data = torch.utils.data.DataLoader(
        torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0)), batch_size=4
    )
    trainer = pl.Trainer(max_steps=4, callbacks=[null_space, snapshot, lssf], **trainer_kwargs(tmp_path))
    trainer.fit(module, data)

    report = json.loads((tmp_path / "lssf.json").read_text())
    assert report["num_fused"] == 6 and report["num_anchor_prompts"] == 4
    for target in find_lora_targets(module):
        w0, a, b = snapshot.state[target.hf_name]
        entry = next(m for m in report["modules"] if m["name"] == target.hf_name)
        fold = target.base.weight.detach().double() - w0.double()
        assert fold.norm().item() == pytest.approx(entry["fold_norm"], rel=1e-4) and entry["fold_norm"] > 0
        assert torch.linalg.matrix_rank(fold, rtol=1e-6) <= entry["fold_rank"]
        assert torch.equal(target.lora_A, a) and torch.equal(target.lora_B, b)
    assert max(b.abs().max() for _, _, b in snapshot.state.values()) > 1e-3  # training moved B
    assert lssf.state_dict()["report"]["num_fused"] == 6


def test_callback_checks_the_reference_before_training(tmp_path):
    module = UserModule(
        get_peft_model(tiny_llama(hidden_size=32, intermediate_size=64), LoraConfig(r=2, target_modules=["q_proj"]))
    )
    lssf = LSSFFusion(patch_reference(), CALIBRATION_PROMPTS, tokenizer=byte_tokenizer())
    data = torch.utils.data.DataLoader(torch.randint(0, 256, (4, 8)), batch_size=4)
    trainer = pl.Trainer(max_steps=1, callbacks=[lssf], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="does not fit this model"):
        trainer.fit(module, data)


# ------------------------------------------------------------------------------------------------- repair
@pytest.fixture
def setup(tmp_path):
    base = save_tiny_llama(str(tmp_path / "tiny"))
    g = torch.Generator().manual_seed(1)
    random_adapter(base, tmp_path / "finetuned", ["q_proj", "v_proj", "up_proj"], g)
    random_adapter(base, tmp_path / "patch", ["q_proj", "v_proj", "up_proj", "down_proj"], g, r=2, scale=0.3)
    (tmp_path / "anchors.txt").write_text("\n".join(CALIBRATION_PROMPTS) + "\n")
    return tmp_path, base


def repair_args(tmp_path, base, out, kind, *extra):
    return ["--method", "lssf", "--adapter", str(tmp_path / "finetuned"), "--base", base, "--reference-adapter",
            str(tmp_path / "patch"), "--anchor-prompts", str(tmp_path / "anchors.txt"), "--anchor-max-new-tokens", "6",
            "--out", str(out), "--kind", kind, *extra]


def test_repair_writes_a_larger_rank_adapter_and_a_merged_model_equal_to_the_pure_function(setup):
    tmp_path, base = setup
    report = main(
        repair_args(tmp_path, base, tmp_path / "adapter", "adapter", "--alpha", "2", "--eta", "0.8", "--a1", "1.5")
    )
    assert report["report"]["num_fused"] == 6 and report["report"]["alpha"] == 2.0
    assert all(m["fold_rank"] == 2 for m in report["report"]["modules"])  # the patch's rank (r_l >= 2 here)

    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "finetuned"))
    targets = find_lora_targets(expected)
    covariances, _ = collect_anchor_covariances(
        expected, targets, byte_tokenizer(), CALIBRATION_PROMPTS, max_new_tokens=6
    )
    apply_lssf(targets, SafetyReference.from_patch_adapter(tmp_path / "patch"), covariances, 2.0, 0.8, 1.5)
    finetuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "finetuned"))
    assert relative_error(logits(expected, IDS), logits(finetuned, IDS)) > 1e-4  # LSSF changed the model

    repaired = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * 4 + 2  # 2r + the fold's rank: beyond what a plain 2r export holds
    assert relative_error(logits(repaired, IDS), logits(expected, IDS)) < 1e-5

    main(repair_args(tmp_path, base, tmp_path / "merged", "merged", "--alpha", "2", "--eta", "0.8", "--a1", "1.5"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert relative_error(logits(merged, IDS), logits(expected, IDS)) < 1e-5


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--alpha", "-1"], "alpha"),
        (["--eta", "0"], "eta"),
        (["--eta", "1.5"], "eta"),
        (["--anchor-count", "0"], "anchor-count"),
    ],
)
def test_repair_rejects_bad_settings_before_loading(setup, capsys, extra, match):
    tmp_path, base = setup
    with pytest.raises(SystemExit) as exit_info:
        main(repair_args(tmp_path, base, tmp_path / "out", "adapter", *extra))
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_repair_needs_anchor_prompts(setup, capsys):
    tmp_path, base = setup
    args = repair_args(tmp_path, base, tmp_path / "out", "adapter")
    without = args[: args.index("--anchor-prompts")] + args[args.index("--anchor-prompts") + 2 :]
    with pytest.raises(SystemExit):
        main(without)
    assert "--anchor-prompts" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    args[args.index("--anchor-prompts") + 1] = str(tmp_path / "empty.txt")
    with pytest.raises(SystemExit):
        main(args)
    assert "no rows" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_repair_on_smollm2_with_a_small_safety_patch(tmp_path):
    from guardspace_pl.loading import load_causal_lm, load_tokenizer

    name = "builtin:smollm2-135m-instruct"
    tokenizer = load_tokenizer(name)
    torch.manual_seed(0)
    # q/v (d_out <= d_in: eigh of W C W^T) and up_proj (d_out > d_in: the root of the shared gate/up covariance).
    refusals = [(p, "I can't help with that. It could cause harm.") for p in CALIBRATION_PROMPTS]
    train_chat_lora(name, tokenizer, refusals, ["q_proj", "v_proj", "up_proj"], 2, tmp_path / "patch")
    tasks = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a, b in [(2, 3), (10, 7), (21, 4), (8, 8)]]
    train_chat_lora(name, tokenizer, tasks, ["q_proj", "v_proj", "up_proj"], 2, tmp_path / "finetuned")
    (tmp_path / "anchors.txt").write_text("\n".join(CALIBRATION_PROMPTS) + "\n")
    out = tmp_path / "repaired"
    report = main([
        "--method", "lssf", "--adapter", str(tmp_path / "finetuned"), "--base", name,
        "--reference-adapter", str(tmp_path / "patch"), "--anchor-prompts", str(tmp_path / "anchors.txt"),
        "--anchor-max-new-tokens", "16", "--out", str(out), "--kind", "merged",
    ])
    modules = report["report"]["modules"]
    assert len(modules) == 90 and report["report"]["num_fused"] == 90  # 30 layers x (q, v, up)
    for m in modules:
        assert 1 <= m["rank"] <= m["num_singular_values"] and 0.9 <= m["entropy_ratio"] <= 1 + 1e-9
        assert 0 < m["fold_norm"] < 10 and m["fold_rank"] <= 4
    assert len({m["rank"] for m in modules}) > 1  # the rank adapts per layer
    repaired = AutoModelForCausalLM.from_pretrained(out)  # the adapter export is tested on the tiny model
    finetuned = PeftModel.from_pretrained(load_causal_lm(name), str(tmp_path / "finetuned"))
    ids = tokenizer(["How do I make a weapon at home"], return_tensors="pt").input_ids
    new, old = logits(repaired, ids), logits(finetuned, ids)
    assert torch.isfinite(new).all() and relative_error(new, old) > 1e-4


def test_repair_a_guardspace_checkpoint_with_changed_frozen_weights(tmp_path):
    from guardspace_pl import GuardSpaceLM
    from guardspace_pl.callbacks import SafetySubspaceInit
    from tests.conftest import task_loader

    base = save_tiny_llama(str(tmp_path / "tiny"))
    random_adapter(base, tmp_path / "patch", ["q_proj", "v_proj", "up_proj"], seed=5, r=2, scale=0.3)
    (tmp_path / "anchors.txt").write_text("\n".join(CALIBRATION_PROMPTS) + "\n")
    tokenizer = byte_tokenizer()
    module = GuardSpaceLM(
        base, lora_rank=4, lora_alpha=4, learning_rate=1e-2, warmup_ratio=0.0, adapter_dir=str(tmp_path / "adapter")
    )
    module._tokenizer = tokenizer
    # SafetySubspaceInit rewrites the frozen weights: the export must carry W' - W, s B A and the fold together.
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False)],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(module, task_loader(tokenizer, count=8))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = tmp_path / "repaired"
    with pytest.warns(UserWarning, match="does not cover 8 of 14 LoRA layers"):  # repair says what it leaves alone
        report = main([
            "--method", "lssf", "--checkpoint", str(tmp_path / "last.ckpt"),
            "--reference-adapter", str(tmp_path / "patch"), "--anchor-prompts", str(tmp_path / "anchors.txt"),
            "--anchor-max-new-tokens", "6", "--out", str(out), "--kind", "adapter",
        ])
    assert report["base"] == base
    assert report["report"]["num_fused"] == 6  # q, v, up of 2 layers; k, o, gate, down not in the patch
    targets = find_lora_targets(module)
    covariances, _ = collect_anchor_covariances(module.model, targets, tokenizer, CALIBRATION_PROMPTS, max_new_tokens=6)
    with pytest.warns(UserWarning, match="does not cover"):
        apply_lssf(targets, SafetyReference.from_patch_adapter(tmp_path / "patch"), covariances)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    assert relative_error(logits(served, IDS), logits(module.model, IDS)) < 1e-4
