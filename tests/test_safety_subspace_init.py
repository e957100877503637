import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

from conftest import CALIBRATION_PROMPTS, LLAMA_PROJECTIONS, logits, task_loader, trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.calibration import CovarianceCollector
from guardspace_pl.callbacks import SafetySubspaceInit
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.testing import relative_error, tiny_llama


def fit_init_only(module, tokenizer, tmp_path, callback):
    """Fit with lr 0 for one step: runs on_fit_start (the decomposition) and leaves the weights as initialised."""
    module.hparams.learning_rate = 0.0
    trainer = pl.Trainer(max_steps=1, callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(module, task_loader(tokenizer, count=4))
    return trainer


def test_init_keeps_the_model_function(tokenizer, tmp_path):
    reference = tiny_llama()
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4, lora_alpha=8)
    fit_init_only(module, tokenizer, tmp_path, SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False))
    targets = find_lora_targets(module)
    assert len(targets) == 14  # 7 projections x 2 blocks, never lm_head
    assert all(torch.count_nonzero(t.lora_B) > 0 for t in targets)  # adapters were really initialised
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    assert relative_error(logits(module.model, ids), logits(reference, ids)) < 1e-4


@pytest.mark.parametrize("components, corda_method", [("kpa", "kpm"), ("ipa", "ipm")])
def test_matches_peft_corda_oracle(tokenizer, tmp_path, components, corda_method):
    rank, alpha = 4, 8
    ids = [tokenizer(p)["input_ids"] for p in CALIBRATION_PROMPTS]

    oracle_base = tiny_llama()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(LLAMA_PROJECTIONS),
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=corda_method),
    )
    preprocess_corda(oracle_base, config, run_model=lambda: [oracle_base(input_ids=torch.tensor([i])) for i in ids])
    oracle = {
        t.name.removeprefix("base_model.model."): t for t in find_lora_targets(get_peft_model(oracle_base, config))
    }

    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=rank, lora_alpha=alpha)
    fit_init_only(
        module,
        tokenizer,
        tmp_path,
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, components=components, progress_bar=False),
    )
    for ours in find_lora_targets(module):
        theirs = oracle[ours.name.removeprefix("model.base_model.model.")]
        a, b = ours.lora_A.detach(), ours.lora_B.detach()
        ta, tb = theirs.lora_A.detach(), theirs.lora_B.detach()
        # Singular pairs are defined up to a sign: align each pair before comparing.
        sign = torch.sign((a * ta).sum(dim=1))
        torch.testing.assert_close(a * sign[:, None], ta, rtol=2e-3, atol=2e-4)
        torch.testing.assert_close(b * sign[None, :], tb, rtol=2e-3, atol=2e-4)
        # PEFT forms W - s B A in float32 (we use float64): the residual agrees to float32 rounding.
        torch.testing.assert_close(ours.base.weight, theirs.base.weight, rtol=1e-4, atol=5e-5)


def test_shared_inputs_accumulate_one_covariance(tokenizer):
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=2, target_modules=list(LLAMA_PROJECTIONS)),
    )
    targets = find_lora_targets(model)
    collector = CovarianceCollector(targets)
    with collector, torch.no_grad():
        for prompt in CALIBRATION_PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            collector.begin_batch(torch.ones_like(ids))
            model(input_ids=ids)
    groups = collector.finalize()
    # Per block: {q,k,v}, {o}, {gate,up}, {down}: 4 distinct inputs, each accumulated once per prompt.
    assert len(collector.groups) == 8
    assert sorted(len(g.members) for g in collector.groups) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert all(g.num_updates == len(CALIBRATION_PROMPTS) for g in collector.groups)
    q = groups["base_model.model.model.layers.0.self_attn.q_proj"]
    assert groups["base_model.model.model.layers.0.self_attn.v_proj"] is q
    assert not any(t.layer._forward_pre_hooks for t in targets)  # hooks removed afterwards


def test_resume_from_cache_does_not_recompute(tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    fit_init_only(
        first,
        tokenizer,
        tmp_path / "a",
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, cache_dir=str(cache), progress_bar=False),
    )
    assert len(list(cache.glob("subspace_*.pt"))) == 1

    # A restart after a crash right after init: the decomposition must come from the cache.
    def fail(*args, **kwargs):
        raise AssertionError("the decomposition was recomputed")

    monkeypatch.setattr(SafetySubspaceInit, "_compute", fail)
    second = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    callback = SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, cache_dir=str(cache), progress_bar=False)
    fit_init_only(second, tokenizer, tmp_path / "b", callback)
    assert callback.loaded_from_cache
    for (n1, p1), (n2, p2) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_errors_are_early_and_clear(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="calibration_prompts is empty"):
        SafetySubspaceInit([], tokenizer, progress_bar=False)  # at construction, before any fit
    big = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=64)
    with pytest.raises(ValueError, match="must be smaller than min"):
        fit_init_only(big, tokenizer, tmp_path, SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False))
    with pytest.raises(ValueError, match="'kpa' or 'ipa'"):
        SafetySubspaceInit(components="smallest")


def test_writes_a_per_layer_report(tokenizer, tmp_path):
    import json

    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    report = tmp_path / "report.json"
    fit_init_only(
        module,
        tokenizer,
        tmp_path,
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, report_path=str(report), progress_bar=False),
    )
    rows = json.loads(report.read_text())
    assert len(rows) == 14
    assert {"layer", "rank", "kept_singular_values", "frozen_singular_values", "damp"} <= set(rows[0])
    assert rows[0]["kept_singular_values"][1] <= rows[0]["frozen_singular_values"][0]


def test_layers_per_pass_bounds_memory_without_changing_the_result(tokenizer, tmp_path):
    one_pass = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    fit_init_only(
        one_pass, tokenizer, tmp_path / "a", SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False)
    )
    passes = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    fit_init_only(
        passes,
        tokenizer,
        tmp_path / "b",
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, layers_per_pass=3, progress_bar=False),
    )
    for (name, p), (_, q) in zip(one_pass.model.named_parameters(), passes.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
