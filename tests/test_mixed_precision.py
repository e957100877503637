"""SafetyGradientProjection and AsFTRegularizer under bf16-mixed and 16-mixed (a real GradScaler) in a real Trainer.

``Trainer(precision="16-mixed", accelerator="cpu")`` silently trains in bf16-mixed (Lightning's fallback, checked
below), but an explicit ``MixedPrecision("16-mixed", "cpu")`` plugin gives fp16 autocast with a real
``torch.amp.GradScaler`` on CPU: the gradients are scaled from the backward until the scaler unscales them just before
``on_before_optimizer_step``. The CUDA cases run where a GPU is present.
"""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from test_training_time_composition import SAFETY, module_for, reference_for
from torch.utils.data import DataLoader

from conftest import task_loader, trainer_kwargs
from guardspace_pl.asft import alignment_factors, asft_value_and_grads
from guardspace_pl.callbacks import AsFTRegularizer, SafetyGradientProjection
from guardspace_pl.datamodules import collate, tokenize_example
from guardspace_pl.datamodules.sources import Example
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.spf import safety_subspace, subspace_inner

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="16-mixed on CUDA needs a GPU (the CPU cases use a CPU GradScaler)"
)
SETTINGS = [
    pytest.param("bf16-mixed", "cpu", id="bf16-mixed-cpu"),
    pytest.param("16-mixed", "cpu", id="16-mixed-cpu-gradscaler"),
    pytest.param("16-mixed", "cuda", id="16-mixed-cuda", marks=CUDA),
]


def precision_kwargs(precision: str, device: str, scaler=None) -> dict:
    if device == "cuda":
        return {"precision": precision, "accelerator": "cuda"}
    if precision == "16-mixed":  # the Trainer flag would fall back to bf16-mixed on CPU
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


class Capture(pl.Callback):
    """Copies of the trainable gradients at ``on_before_optimizer_step`` (where it sits in the callback list), and
    the loss scale the step ran under."""

    def __init__(self):
        self.grads, self.scales = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else 1.0)


def harmful_loader(tokenizer) -> DataLoader:
    """Compliant answers to SPF's harmful prompt (harmful fine-tuning): task gradients that come to conflict with
    the refusal's."""
    prompt = SAFETY[0][0]
    verbs = ["pack", "seal", "hide", "light"] * 4
    answers = [f"Sure! Step {i}: get the parts, mix them, and {w} it." for i, w in enumerate(verbs)]
    rows = [tokenize_example(tokenizer, Example(prompt, a), "chat_template", 256) for a in answers]
    return DataLoader(rows, batch_size=4, shuffle=False, collate_fn=lambda r: collate(r, tokenizer.pad_token_id))


def fit(tokenizer, tmp_path, callbacks, module, steps, precision, device, scaler=None, loader=None, **overrides):
    kwargs = trainer_kwargs(tmp_path, **precision_kwargs(precision, device, scaler), **overrides)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **kwargs)
    trainer.fit(module, loader or task_loader(tokenizer, count=16, batch_size=4))
    return trainer


def test_16_mixed_flag_on_cpu_falls_back_to_bf16_without_a_scaler(tmp_path):
    """Why the CPU cases pass a MixedPrecision plugin: the flag alone gives bf16-mixed, which has no GradScaler."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(precision="16-mixed", **trainer_kwargs(tmp_path))
    assert trainer.precision_plugin.precision == "bf16-mixed" and trainer.precision_plugin.scaler is None
    assert any("not supported on CPU" in str(w.message) for w in caught)
    plugin = pl.Trainer(**trainer_kwargs(tmp_path, **precision_kwargs("16-mixed", "cpu"))).precision_plugin
    assert plugin.precision == "16-mixed" and plugin.scaler.is_enabled()


@pytest.mark.parametrize("precision,device", SETTINGS)
def test_asft_gradient_is_the_analytic_one_under_mixed_precision(tokenizer, tmp_path, precision, device):
    """With and without AsFT (same precision, same batches): the unscaled gradients the optimizer gets differ by
    exactly the analytic AsFT gradient, once per micro-batch. Under 16-mixed the gradients are scaled at
    ``on_after_backward``, where AsFT adds its term: left unscaled it would arrive divided by the loss scale."""
    accumulate, weight = 2, 3.0
    grads, scales, states = {}, {}, {}
    reference = None
    for mode in ("asft", "plain"):
        module = module_for(tokenizer)
        with torch.no_grad():  # B = 0 (LoRA's init) would make d/dA zero
            for t in find_lora_targets(module):
                t.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        reference = reference or reference_for(module)
        targets = find_lora_targets(module)
        states[mode] = {t.name: (t.lora_A.detach().clone(), t.lora_B.detach().clone()) for t in targets}
        capture = Capture()
        asft = AsFTRegularizer(reference, regularization_weight=weight)
        callbacks = [capture] if mode == "plain" else [asft, capture]
        fit(tokenizer, tmp_path / mode, callbacks, module, 1, precision, device, accumulate_grad_batches=accumulate)
        (grads[mode],), (scales[mode],) = capture.grads, capture.scales
    if precision == "16-mixed":
        assert scales["asft"] == scales["plain"] == 2.0**16  # a real scaler, and no overflow step
    for t in find_lora_targets(module):
        lora_A, lora_B = states["asft"][t.name]
        u, sigma = reference.vector(t.hf_name).spectrum()
        basis, weights = alignment_factors(u, sigma, reference.vector(t.hf_name).norm(), "faithful")
        _, grad_A, grad_B = asft_value_and_grads(
            lora_A.double().cpu(), lora_B.double().cpu(), basis.double(), weights.double(), weight
        )
        for which, analytic in (("lora_A", grad_A), ("lora_B", grad_B)):
            name = f"{t.name}.{which}.{t.adapter}.weight"
            added = (grads["asft"][name] - grads["plain"][name]).double().cpu()
            error = ((added - accumulate * analytic).norm() / (accumulate * analytic).norm()).item()
            # Both runs share the task gradient bit for bit; only its float32 sum with the AsFT term rounds.
            assert error < 1e-4, f"{name}: relative error {error:.2e} (loss scale {scales['asft']})"


@pytest.mark.parametrize("precision,device", SETTINGS)
def test_spf_removes_every_conflict_under_mixed_precision(tokenizer, tmp_path, precision, device):
    """Gradients just before and just after SPF's edit, every step: a matrix whose (unscaled) task gradient conflicts
    with its safety subspace (<G_u, G_s^(k)> < 0) is edited to <G_u, G_s^(k)> >= -eps; the others are untouched. The
    cached safety subspace is that of the unscaled safety gradient (the loss scale divided out)."""
    module = module_for(tokenizer)
    before, after = Capture(), Capture()
    spf = SafetyGradientProjection(SAFETY, tokenizer)

    class Subspaces(pl.Callback):
        def __init__(self):
            self.steps = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.steps.append(dict(spf.subspaces))

    subspaces = Subspaces()
    callbacks = [before, spf, after, subspaces]
    fit(tokenizer, tmp_path, callbacks, module, 6, precision, device, loader=harmful_loader(tokenizer))
    assert spf.safety_passes == 6
    conflicts = 0
    for step, (grads_before, grads_after, cached) in enumerate(zip(before.grads, after.grads, subspaces.steps)):
        for name, subspace in cached.items():
            key = next(k for k in grads_before if k.endswith(name))
            g_before, g_after = grads_before[key].float(), grads_after[key].float()
            assert torch.isfinite(g_after).all(), f"step {step} {name}"
            scale = g_before.norm().item() * subspace.s.norm().item()
            if subspace_inner(g_before, subspace).item() < 0:
                conflicts += 1
                assert subspace_inner(g_after, subspace).item() >= -1e-5 * scale, f"step {step} {name}"
                assert (subspace.u.T @ g_after @ subspace.v).abs().max().item() <= 1e-5 * g_before.norm().item()
            else:
                assert torch.equal(g_after, g_before), f"step {step} {name}"
    assert conflicts > 0  # the edit itself was exercised
    if precision == "16-mixed":
        assert before.scales[0] == 2.0**16
    # The first refresh's subspaces (at the initial weights, before any step) against the float32 safety gradient of
    # the same model: fp16/bf16 rounding only, where a loss scale left in would be a factor 65536.
    first = subspaces.steps[0]
    exact = safety_gradients(module_for(tokenizer), tokenizer, list(first))
    compared = 0
    for name, subspace in first.items():
        reference = safety_subspace(exact[name], spf.cer, spf.k_max)
        if reference.rank == 0:  # lora_A while B = 0 (LoRA's init): a zero gradient in every precision
            assert subspace.rank == 0, name
            continue
        compared += 1
        top, expected = subspace.s[0].item(), reference.s[0].item()
        assert abs(top - expected) <= 0.05 * expected, f"{name}: top safety singular value {top:.3g} vs {expected:.3g}"
    assert compared > 0


def safety_gradients(module, tokenizer, names) -> dict:
    """The float32 safety gradient of the named parameters at the module's current weights, without autocast."""
    rows = [tokenize_example(tokenizer, Example(*s), "chat_template", 256) for s in SAFETY]
    batch = collate(rows, tokenizer.pad_token_id)
    params = dict(module.model.named_parameters())
    chosen = {name: next(p for n, p in params.items() if n.endswith(name)) for name in names}
    device = next(iter(chosen.values())).device
    was = module.model.training
    module.model.eval()
    loss = module.model(**{k: v.to(device) for k, v in batch.items()}).loss
    grads = torch.autograd.grad(loss, list(chosen.values()))
    module.model.train(was)
    return dict(zip(chosen, grads))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the skipped overflow step
def test_spf_safety_gradient_survives_an_overflowing_loss_scale(tokenizer, tmp_path):
    """A loss scale that overflows fp16 (the scaler skips such task steps): SPF computes its safety gradient once more
    unscaled, so the cached subspace stays finite and equal to that of an ordinary scale."""
    cached = {}
    for label, init_scale in (("ordinary", 2.0**16), ("overflow", 2.0**100)):
        module = module_for(tokenizer)
        spf = SafetyGradientProjection(SAFETY, tokenizer)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        fit(tokenizer, tmp_path / label, [spf], module, 1, "16-mixed", "cpu", scaler=scaler)
        cached[label] = spf.subspaces
        if label == "overflow":
            assert scaler.get_scale() < init_scale  # the task step did overflow and was skipped
    for name, subspace in cached["overflow"].items():
        assert torch.isfinite(subspace.s).all() and torch.isfinite(subspace.u).all(), name
        torch.testing.assert_close(subspace.s, cached["ordinary"][name].s, rtol=1e-2, atol=1e-6, msg=name)
