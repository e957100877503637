"""Training-step cost of keeping LoRA in a null space: this project's design vs the official one.

Three designs, on one PEFT LoRA model (q, k, v, o, gate, up, down) and one batch, in one run:

1. ``lora``: plain PEFT LoRA (forward + backward + AdamW step).
2. ``guardspace``: this project. The same forward; once per optimizer step
   ``grad(lora_A) <- grad(lora_A) @ P`` and, after the step, ``lora_A <- lora_A @ P``, both with
   ``NullSpaceProjector.project``. ``P`` is stored as the smaller orthonormal basis, one per
   distinct layer input (q/k/v share one, gate/up share one), as ``null_space_projector`` does.
3. ``official_dense_P``: the official GuardSpace code. A dense ``n x n`` buffer ``P`` per module
   applied in the forward pass, ``y = W x + s B A (P x)``, here by a forward pre-hook on each
   ``lora_A`` Linear that replaces its input ``x`` with ``x @ P``: an extra ``n^2`` per token and
   module, forward and backward.
4. ``spf`` / ``spf_refresh<N>``: ``SafetyGradientProjection``'s work before each optimizer step (a safety gradient of
   one short sequence every 1 / 10 steps, per-matrix CER-truncated SVDs, the conflict gate and edit).
5. ``asft``: ``AsFTRegularizer``'s analytic gradient added after every backward (random rank-8 ``C``).

The projectors are random orthonormal bases of dimension ``--null-fraction * in_features``
(timing and memory do not depend on which subspace it is). Step time is the median over
``--steps`` timed steps after ``--warmup`` untimed ones; the designs take turns step by step (in
rotated order) so that a slow spell of a shared machine falls on all of them alike
(``--sequential`` times one design at a time, for when their states do not fit together). Peak
memory is measured separately, one design alone over ``--memory-steps`` steps, above the level of
the loaded model, so that each design's projectors, optimizer state, activations and gradients
all count.

Examples::

    python -m benchmarks.step_overhead --profile cpu
    python -m benchmarks.step_overhead --profile smollm2 --designs lora spf spf_refresh2 asft
    python -m benchmarks.step_overhead --profile llama7b --device cuda
    python -m benchmarks.step_overhead --profile llama7b --device cuda --layers 16   # if memory is tight
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks._common import (
    LLAMA_LINEAR_INPUT,
    PeakMemory,
    add_shape_arguments,
    benchmark_parser,
    current_memory,
    describe_machine,
    finish_run,
    heap_reuse,
    markdown_table,
    median,
    memory_method,
    mib,
    release_memory,
    repeat_timed,
    shape_overrides,
    start_run,
    tensor_bytes,
    timed,
)
from guardspace_pl.lora import LoraTarget, find_lora_targets
from guardspace_pl.null_space import NullSpaceProjector
from guardspace_pl.testing import tiny_llama

TARGET_MODULES: tuple[str, ...] = tuple(LLAMA_LINEAR_INPUT)
DESIGNS: tuple[str, ...] = ("lora", "guardspace", "official_dense_P", "spf", "spf_refresh10", "asft")
#: ``spf_refresh<N>`` (any N >= 1, e.g. ``spf_refresh25``): SPF refreshing its safety subspace every N steps
SPF_REFRESH_DESIGN = re.compile(r"spf_refresh([1-9][0-9]*)")


def design_name(value: str) -> str:
    """``--designs`` entries: a name of ``DESIGNS`` or ``spf_refresh<N>``."""
    if value in DESIGNS or SPF_REFRESH_DESIGN.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(f"unknown design {value!r}: one of {', '.join(DESIGNS)} or spf_refresh<N>")
SAFETY_SEQ = 48  # tokens of the SPF safety sample (a short prompt + refusal)
ASFT_RANK = 8  # rank of the alignment vector V (a safety patch of rank 8)
BASIS_DTYPE = torch.float32  # null_space_projector's default storage dtype
T = TypeVar("T")


# --------------------------------------------------------------------------- profiles and model
@dataclass(frozen=True)
class Setup:
    """Model shape, batch and LoRA rank of one profile."""

    hidden: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    rank: int
    dtype: str  # weights of the base model
    autocast: bool  # bf16 autocast around forward (the GPU recipe: bf16 base, float32 adapters)

    def llama_shape(self) -> dict[str, int]:
        """The model's shape under the names ``LlamaConfig`` (and ``tiny_llama``) give it."""
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
        )


PROFILES: dict[str, Setup] = {
    # float32: on these CPUs bf16 is many times slower than float32 (no bf16 matrix units).
    "cpu": Setup(
        hidden=256, mlp=688, layers=4, heads=4, kv_heads=4, vocab=1024, batch=4, seq=128, rank=16, dtype="float32",
        autocast=False,
    ),
    # SmolLM2-135M-Instruct's shape (the demo model, random weights) at the safety benchmark's CPU training batch
    # (benchmarks/safety, profile cpu: 8 sequences of 160 tokens, rank 16): where SPF's safety pass is a realistic
    # share of a step, unlike the 4-layer cpu shape, whose small matrices make every pass cost its op count.
    "smollm2": Setup(
        hidden=576, mlp=1536, layers=30, heads=9, kv_heads=3, vocab=49152, batch=8, seq=160, rank=16,
        dtype="float32", autocast=False,
    ),
    # Llama-2-7B, the paper's r = 128 and max length 512, batch 1 (the paper accumulates 128 of them).
    "llama7b": Setup(
        hidden=4096, mlp=11008, layers=32, heads=32, kv_heads=32, vocab=32000, batch=1, seq=512, rank=128,
        dtype="bfloat16", autocast=True,
    ),
}


def build_base_model(setup: Setup, profile: str, seed: int, device: torch.device) -> LlamaForCausalLM:
    """A randomly initialised Llama: ``tiny_llama`` for the cpu profile, built on ``device`` otherwise."""
    dtype = getattr(torch, setup.dtype)
    if profile == "cpu":
        model = tiny_llama(**setup.llama_shape(), seed=seed, dtype=dtype, max_position_embeddings=max(512, setup.seq))
        return model.to(device)
    config = LlamaConfig(
        **setup.llama_shape(), max_position_embeddings=max(4096, setup.seq), tie_word_embeddings=profile == "smollm2"
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate the 7B weights in bf16 directly, on the device
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """PEFT LoRA on the seven linears of every block (adapters in float32, PEFT's default)."""
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def input_key(target: LoraTarget) -> str:
    """``<block prefix>:<input group>``: the targets that share a key read the same tensor."""
    block, _, module = target.name.rsplit(".", 2)
    return f"{block}:{LLAMA_LINEAR_INPUT[module]}"


# --------------------------------------------------------------------------- projectors
def random_projector(
    in_features: int, null_dim: int, generator: torch.Generator, device: torch.device
) -> NullSpaceProjector:
    """A projector onto a random ``null_dim``-dimensional subspace, stored as ``null_space_projector`` stores it.

    The thinner basis is kept: the null basis (``P = Q Q^T``) or its complement (``P = I - U U^T``).
    """
    complement = null_dim > in_features - null_dim
    columns = in_features - null_dim if complement else null_dim
    gaussian = torch.randn(in_features, columns, generator=generator, dtype=BASIS_DTYPE).to(device)
    basis = torch.linalg.qr(gaussian)[0] if columns else gaussian
    return NullSpaceProjector(basis=basis.contiguous(), complement=complement, null_dim=null_dim)


def make_projectors(
    targets: Sequence[LoraTarget], null_fraction: float, seed: int, device: torch.device
) -> dict[str, NullSpaceProjector]:
    """One projector per distinct layer input (separate storage per block), keyed by ``input_key``.

    One random basis is drawn per input width and copied to every block: the values are irrelevant
    to cost, and drawing 128 large QRs would only slow the benchmark's setup.
    """
    generator = torch.Generator().manual_seed(seed)
    templates: dict[int, NullSpaceProjector] = {}
    projectors: dict[str, NullSpaceProjector] = {}
    for target in targets:
        key = input_key(target)
        if key in projectors:
            continue
        n = target.shape[1]
        if n not in templates:
            templates[n] = random_projector(n, round(null_fraction * n), generator, device)
        template = templates[n]
        projectors[key] = NullSpaceProjector(template.basis.clone(), template.complement, template.null_dim)
    return projectors


def projector_bytes(projectors: dict[str, NullSpaceProjector]) -> int:
    return sum(tensor_bytes(p.basis) for p in projectors.values())


def _dense_projection_hook(module: nn.Module, args: tuple) -> tuple:
    """``x <- x @ P`` on the input of ``lora_A``: the official code's ``PLinear`` in the forward pass."""
    return (args[0] @ module.guardspace_dense_P, *args[1:])


def dense_projections(
    targets: Sequence[LoraTarget], projectors: dict[str, NullSpaceProjector], dtype: torch.dtype
) -> dict[nn.Module, Tensor]:
    """The official design's matrices: one dense ``n x n`` ``P`` per ``lora_A`` Linear.

    One matrix per module (q, k and v included), as the official code holds one ``PLinear`` per module.
    """
    dense_by_key: dict[str, Tensor] = {}
    out: dict[nn.Module, Tensor] = {}
    for target in targets:
        key = input_key(target)
        if key not in dense_by_key:
            dense_by_key[key] = projectors[key].dense().to(dtype)
        out[target.layer.lora_A[target.adapter]] = dense_by_key[key].clone()
    return out


# --------------------------------------------------------------------------- training step
def train_step(
    model: nn.Module,
    input_ids: Tensor,
    optimizer: torch.optim.Optimizer,
    autocast_dtype: Optional[torch.dtype],
    grad_accum: int,
    projection: Sequence[tuple[nn.Parameter, NullSpaceProjector]] = (),
    after_backward: Optional[Callable[[], None]] = None,
    before_step: Optional[Callable[[], None]] = None,
) -> None:
    """Forward + backward (``grad_accum`` micro-batches) + AdamW step; with ``projection``, GuardSpace's two
    projections.

    The projections sit where ``NullSpaceProjection`` puts them: on the accumulated gradient before
    the optimizer step (``on_before_optimizer_step``), and on ``lora_A`` after it.
    """
    for _ in range(grad_accum):
        autocast = torch.autocast(
            input_ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        )
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        (loss / grad_accum).backward()
        if after_backward is not None:  # AsFTRegularizer's hook: every micro-batch
            after_backward()
    if before_step is not None:  # SafetyGradientProjection's hook: accumulated gradients, before the step
        before_step()
    with torch.no_grad():
        for param, projector in projection:
            if param.grad is not None:
                param.grad.copy_(projector.project(param.grad))
    optimizer.step()
    with torch.no_grad():
        for param, projector in projection:
            param.copy_(projector.project(param))
    optimizer.zero_grad(set_to_none=True)


class Design:
    """One design's state on the shared model: its adapter values, optimizer state and projectors.

    Several designs can live side by side on one model; ``activate`` puts a design's adapter values
    (and, for the official design, its ``P`` buffers and pre-hooks) into the model, ``deactivate``
    takes them out again.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        targets: Sequence[LoraTarget],
        initial: dict[str, Tensor],
        input_ids: Tensor,
        args: argparse.Namespace,
        autocast_dtype: Optional[torch.dtype],
        device: torch.device,
        projectors: Optional[dict[str, NullSpaceProjector]] = None,
        label: Optional[str] = None,
    ) -> None:
        """``projectors`` (keyed by ``input_key``): real ones to use instead of random bases; ``label``: the name
        reported."""
        self.name = label or name
        self.model = model
        self.input_ids = input_ids
        self.autocast_dtype = autocast_dtype
        self.grad_accum = args.grad_accum
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.values = initial  # shared until this design first deactivates and keeps its own copy
        self._own_values = False
        self.projection: list[tuple[nn.Parameter, NullSpaceProjector]] = []
        self.dense: dict[nn.Module, Tensor] = {}
        self.projector_bytes = 0
        self.after_backward: Optional[Callable[[], None]] = None
        self.before_step: Optional[Callable[[], None]] = None
        self.parts: dict[str, list[float]] = {}  # seconds of timed parts of this design's own work
        if name == "asft":
            self.after_backward = _asft_hook(targets, args.seed, device)
        elif name == "spf" or SPF_REFRESH_DESIGN.fullmatch(name):
            refresh_every = 1 if name == "spf" else int(SPF_REFRESH_DESIGN.fullmatch(name).group(1))
            self.before_step = _spf_hook(
                model, self.params, refresh_every, args.seed, autocast_dtype, device, input_ids, self.parts
            )
        if name in ("guardspace", "official_dense_P"):
            projectors = projectors or make_projectors(targets, args.null_fraction, args.seed, device)
            if name == "guardspace":
                self.projection = [(t.lora_A, projectors[input_key(t)]) for t in targets]
                self.projector_bytes = projector_bytes(projectors)
            else:  # official_dense_P keeps only the dense matrices
                self.dense = dense_projections(targets, projectors, autocast_dtype or targets[0].lora_A.dtype)
                self.projector_bytes = tensor_bytes(*self.dense.values())
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=1e-4, weight_decay=0.0)
        self._handles: list[Any] = []

    @torch.no_grad()
    def activate(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.values[name])
        for module, matrix in self.dense.items():
            module.register_buffer("guardspace_dense_P", matrix, persistent=False)  # a buffer, not a parameter
            self._handles.append(module.register_forward_pre_hook(_dense_projection_hook))

    @torch.no_grad()
    def deactivate(self, keep_values: bool = True) -> None:
        if keep_values:
            if not self._own_values:
                self.values = {name: param.detach().clone() for name, param in self.params.items()}
                self._own_values = True
            else:
                for name, param in self.params.items():
                    self.values[name].copy_(param)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.dense:
            del module.guardspace_dense_P

    def step(self) -> None:
        train_step(
            self.model, self.input_ids, self.optimizer, self.autocast_dtype, self.grad_accum, self.projection,
            self.after_backward, self.before_step,
        )


def _asft_hook(targets: Sequence[LoraTarget], seed: int, device: torch.device) -> Callable[[], None]:
    """``AsFTRegularizer.on_after_backward``: add the analytic regulariser gradient (random rank-8 ``V`` per module)."""
    from guardspace_pl.asft import asft_value_and_grads

    generator = torch.Generator().manual_seed(seed)
    factors = []
    for target in targets:
        basis = torch.linalg.qr(torch.randn(target.shape[0], ASFT_RANK, generator=generator))[0].to(device)
        factors.append((target, basis, torch.rand(ASFT_RANK, generator=generator).to(device)))

    @torch.no_grad()
    def hook() -> None:
        for target, basis, weights in factors:
            _, grad_A, grad_B = asft_value_and_grads(target.lora_A.float(), target.lora_B.float(), basis, weights, 1.0)
            target.lora_A.grad.add_(grad_A.to(target.lora_A.grad.dtype))
            target.lora_B.grad.add_(grad_B.to(target.lora_B.grad.dtype))

    return hook


def _spf_hook(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    refresh_every: int,
    seed: int,
    autocast_dtype: Optional[torch.dtype],
    device: torch.device,
    input_ids: Tensor,
    parts: dict[str, list[float]],
) -> Callable[[], None]:
    """``SafetyGradientProjection.on_before_optimizer_step``: safety gradient (one sequence), batched per-shape
    subspaces, the batched gate and edit with one host sync, written back where a matrix conflicted. Appends the
    seconds of each part (``safety_pass``, ``decomposition`` on refresh steps; ``gate`` every step) to ``parts``."""
    from guardspace_pl.losses import response_loss
    from guardspace_pl.spf import remove_conflicts, safety_subspaces

    generator = torch.Generator().manual_seed(seed + 1)
    safety_ids = torch.randint(0, int(input_ids.max()) + 1, (1, SAFETY_SEQ), generator=generator).to(device)
    labels = safety_ids.clone()
    labels[:, : SAFETY_SEQ // 2] = -100  # the loss on the refusal only
    matrices = [p for p in params.values() if p.ndim == 2]
    state: dict[str, Any] = {"step": 0, "subspaces": None}

    def safety_pass() -> tuple[Optional[Tensor], ...]:
        dtype = autocast_dtype or torch.bfloat16
        with torch.autocast(device.type, dtype=dtype, enabled=autocast_dtype is not None):
            loss = response_loss(model, safety_ids, labels)  # the callback's loss: no logits for the prompt
        return torch.autograd.grad(loss, matrices, allow_unused=True)

    @torch.no_grad()
    def gate() -> None:
        edit = remove_conflicts([p.grad for p in matrices], state["subspaces"])
        for param, edited, conflicted in zip(matrices, edit.grads, edit.conflicted.tolist()):
            if conflicted:
                param.grad.copy_(edited)

    def record(part: str, fn: Callable[[], T]) -> T:
        result, seconds = timed(fn, device)
        parts.setdefault(part, []).append(seconds)
        return result

    def hook() -> None:
        if state["step"] % refresh_every == 0:
            grads = record("safety_pass", safety_pass)
            zeros_for_unused = [g if g is not None else torch.zeros_like(p) for p, g in zip(matrices, grads)]
            state["subspaces"] = record("decomposition", lambda: safety_subspaces(zeros_for_unused))
        state["step"] += 1
        record("gate", gate)

    return hook


@dataclass
class DesignResult:
    design: str
    step_seconds: list[float]
    peak_bytes: int  # absolute peak during the memory steps
    delta_bytes: int  # peak above the loaded model: optimizer state, projectors, activations, gradients
    projector_bytes: int
    part_seconds: dict[str, list[float]] = field(default_factory=dict)  # timed parts of a design's own work

    @property
    def median_s(self) -> float:
        return median(self.step_seconds)

    @property
    def mean_s(self) -> float:
        """The mean counts the occasional costly step (an SPF refresh every ``refresh_every`` steps); the median not."""
        return sum(self.step_seconds) / len(self.step_seconds)


def measure_memory(
    design: str, make: Callable[[str], Design], steps: int, device: torch.device
) -> tuple[int, int, int]:
    """Peak memory of ``steps`` steps of one design alone: absolute, above the loaded model, and its projector bytes.

    The baseline is taken before the design's projectors and optimizer exist, so both count.
    """
    baseline = current_memory(device)
    state = make(design)
    state.activate()
    with PeakMemory(device) as memory:
        for _ in range(steps):
            state.step()
    state.deactivate(keep_values=False)
    stored = state.projector_bytes
    del state
    release_memory(device)
    return memory.peak_bytes, max(0, memory.peak_bytes - baseline), stored


def time_designs(
    designs: Sequence[str],
    make: Callable[[str], Design],
    warmup: int,
    steps: int,
    interleave: bool,
    device: torch.device,
    parts: Optional[dict[str, dict[str, list[float]]]] = None,
) -> dict[str, list[float]]:
    """Step seconds of every design after ``warmup`` untimed steps; with ``parts``, each design's timed parts
    (``Design.parts``, e.g. SPF's safety pass, decomposition and gate) of the timed steps go there too.

    Interleaved (default): all designs live at once and take turns step by step, in rotated order,
    so that a slow spell of a shared machine falls on every design alike. Sequential: one design at
    a time (less memory: only one design's projectors and optimizer state exist at once).
    """
    times: dict[str, list[float]] = {d: [] for d in designs}
    if not interleave:
        for design in designs:
            state = make(design)
            state.activate()
            for _ in range(warmup):
                state.step()
            state.parts.clear()
            times[design] = repeat_timed(state.step, device, 0, steps)
            if parts is not None:
                parts[state.name] = dict(state.parts)
            state.deactivate(keep_values=False)
            del state
            release_memory(device)
        return times
    states = [make(design) for design in designs]
    for i in range(warmup + steps):
        if i == warmup:
            for state in states:
                state.parts.clear()
        shift = i % len(states)
        for state in states[shift:] + states[:shift]:
            state.activate()
            _, seconds = timed(state.step, device)
            state.deactivate()
            if i >= warmup:
                times[state.name].append(seconds)
    if parts is not None:
        parts.update({state.name: dict(state.parts) for state in states})
    return times


def warm_up(model: nn.Module, input_ids: Tensor, autocast_dtype: Optional[torch.dtype]) -> None:
    """Two throwaway LoRA steps: one-time allocations (autograd engine, caches, kernels) must not land on the first
    design."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        train_step(model, input_ids, optimizer, autocast_dtype, 1)
    del optimizer


# --------------------------------------------------------------------------- reporting
def design_summary(result: DesignResult, lora: DesignResult, weights: dict[str, int]) -> dict[str, Any]:
    """One design's JSON row: its measurements and its ratios to plain LoRA."""
    return {
        **asdict(result),
        "median_step_s": result.median_s,
        "time_ratio_vs_lora": result.median_s / lora.median_s,
        "mean_step_s": result.mean_s,
        "mean_time_ratio_vs_lora": result.mean_s / lora.mean_s,
        "peak_ratio_vs_lora": result.peak_bytes / lora.peak_bytes,
        "projector_percent_of_base_weights": 100.0 * result.projector_bytes / weights["base_model_bytes"],
    }


def weight_bytes(model: nn.Module, targets: Sequence[LoraTarget]) -> dict[str, int]:
    """Bytes of the base model's weights (LoRA excluded) and of the adapted linears' weights alone."""
    base = sum(tensor_bytes(p) for name, p in model.named_parameters() if "lora_" not in name)
    adapted = sum(tensor_bytes(t.base.weight) for t in targets)
    return {"base_model_bytes": base, "adapted_linears_bytes": adapted}


def projector_memory_by_fraction(
    targets: Sequence[LoraTarget], fractions: Sequence[float], dense_itemsize: int, base_bytes: int
) -> list[dict[str, Any]]:
    """Projector storage of both designs as a function of the null-space fraction (analytic).

    This project: one float32 basis of ``min(d, n - d)`` columns per distinct input. Official:
    a dense ``n x n`` matrix per module whatever ``d`` is.
    """
    widths = {input_key(t): t.shape[1] for t in targets}
    dense = sum(t.shape[1] ** 2 * dense_itemsize for t in targets)
    rows = []
    for fraction in fractions:
        ours = sum(
            n * min(round(fraction * n), n - round(fraction * n)) * BASIS_DTYPE.itemsize for n in widths.values()
        )
        rows.append(
            {
                "null_fraction": fraction,
                "guardspace_bytes": ours,
                "guardspace_percent_of_base": 100.0 * ours / base_bytes,
                "official_bytes": dense,
                "official_percent_of_base": 100.0 * dense / base_bytes,
            }
        )
    return rows


def render(
    results: Sequence[DesignResult],
    weights: dict[str, int],
    by_fraction: Sequence[dict[str, Any]],
    null_fraction: float,
) -> str:
    """The printed report (Markdown)."""
    lora = results[0]
    table = markdown_table(
        [
            "design",
            "step ms (median)",
            "time vs LoRA",
            "step ms (mean)",
            "mean vs LoRA",
            "peak MiB",
            "peak vs LoRA",
            "added over model MiB",
            "added vs LoRA",
            "projector MiB",
            "projector % of base weights",
        ],
        [
            [
                r.design,
                f"{1e3 * r.median_s:.1f}",
                f"{r.median_s / lora.median_s:.3f}x",
                f"{1e3 * r.mean_s:.1f}",
                f"{r.mean_s / lora.mean_s:.3f}x",
                f"{mib(r.peak_bytes):.1f}",
                f"{r.peak_bytes / lora.peak_bytes:.3f}x",
                f"{mib(r.delta_bytes):.1f}",
                f"{r.delta_bytes / lora.delta_bytes:.2f}x" if lora.delta_bytes else "-",
                f"{mib(r.projector_bytes):.2f}",
                f"{100.0 * r.projector_bytes / weights['base_model_bytes']:.1f}%",
            ]
            for r in results
        ],
    )
    fraction_table = markdown_table(
        [
            "null fraction d/n",
            "this project: bases MiB",
            "% of base weights",
            "official: dense P MiB",
            "% of base weights",
        ],
        [
            [
                f"{f['null_fraction']:g}",
                f"{mib(f['guardspace_bytes']):.2f}",
                f"{f['guardspace_percent_of_base']:.1f}%",
                f"{mib(f['official_bytes']):.2f}",
                f"{f['official_percent_of_base']:.1f}%",
            ]
            for f in by_fraction
        ],
    )
    parts_rows = [
        [
            r.design,
            part,
            str(len(seconds)),
            f"{1e3 * median(seconds):.1f}",
            f"{1e3 * sum(seconds) / len(r.step_seconds):.1f}",
            f"{100.0 * sum(seconds) / len(r.step_seconds) / lora.mean_s:.1f}%",
        ]
        for r in results
        for part, seconds in r.part_seconds.items()
        if seconds
    ]
    parts_table = markdown_table(
        ["design", "part", "calls", "ms per call (median)", "ms per step (mean)", "% of LoRA's mean step"], parts_rows
    )
    parts_section = f"## Where the added time goes\n\n{parts_table}\n\n" if parts_rows else ""
    return (
        f"## Step time and memory (null fraction {null_fraction:g})\n\n{table}\n\n{parts_section}"
        f"Base model weights: {mib(weights['base_model_bytes']):.1f} MiB "
        f"(adapted linears {mib(weights['adapted_linears_bytes']):.1f} MiB).\n\n"
        f"## Projector storage by null-space fraction\n\n{fraction_table}"
    )


# --------------------------------------------------------------------------- entry point
SHAPE_FIELDS = ("layers", "hidden", "mlp", "batch", "seq", "rank")  # --heads also sets the KV heads


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, PROFILES, "step_overhead")
    add_shape_arguments(parser, *SHAPE_FIELDS, "heads")
    parser.add_argument("--null-fraction", type=float, default=0.5, help="null-space dimension / in_features")
    parser.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (projection runs once per step)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per design")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per design (median)")
    parser.add_argument(
        "--sequential", action="store_true", help="time one design at a time instead of interleaving (less memory)"
    )
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="steps per design run under the peak-memory monitor"
    )
    parser.add_argument(
        "--designs",
        nargs="+",
        type=design_name,
        default=list(DESIGNS),
        help=f"lora must come first (ratios); one of {', '.join(DESIGNS)} or spf_refresh<N>",
    )
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.05, 0.25, 0.5, 0.75, 0.95],
        help="null fractions of the storage table",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.designs[0] != "lora":
        raise SystemExit("--designs must start with lora: the other designs are reported relative to it.")
    device, env = start_run(args)
    overrides = shape_overrides(args, *SHAPE_FIELDS)
    if args.heads is not None:
        overrides.update(heads=args.heads, kv_heads=args.heads)
    setup = replace(PROFILES[args.profile], **overrides)
    autocast_dtype = torch.bfloat16 if setup.autocast else None
    print(f"step-overhead benchmark, profile {args.profile}: {setup}\n{describe_machine(env)}\n")

    model = add_lora(build_base_model(setup, args.profile, args.seed, device), setup.rank)
    model.train()
    targets = find_lora_targets(model)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, setup.vocab, (setup.batch, setup.seq), generator=generator).to(device)

    warm_up(model, input_ids, autocast_dtype)

    def make(design: str) -> Design:
        return Design(design, model, targets, initial, input_ids, args, autocast_dtype, device)

    memory = {design: measure_memory(design, make, args.memory_steps, device) for design in args.designs}
    with heap_reuse(device):  # after every memory measurement (see benchmarks/_common.py)
        parts: dict[str, dict[str, list[float]]] = {}
        times = time_designs(args.designs, make, args.warmup, args.steps, not args.sequential, device, parts)
    results = [DesignResult(design, times[design], *memory[design], parts[design]) for design in args.designs]
    weights = weight_bytes(model, targets)
    dense_itemsize = (autocast_dtype or targets[0].lora_A.dtype).itemsize
    by_fraction = projector_memory_by_fraction(targets, args.fractions, dense_itemsize, weights["base_model_bytes"])
    print(render(results, weights, by_fraction, args.null_fraction))

    lora = results[0]
    payload = {
        "benchmark": "step_overhead",
        "profile": args.profile,
        "setup": asdict(setup),
        "null_fraction": args.null_fraction,
        "grad_accum": args.grad_accum,
        "warmup": args.warmup,
        "steps": args.steps,
        "interleaved": not args.sequential,
        "memory_steps": args.memory_steps,
        "memory_method": memory_method(device),
        "environment": env,
        "weights": weights,
        "designs": [design_summary(r, lora, weights) for r in results],
        "projector_memory_by_null_fraction": by_fraction,
    }
    finish_run(args, "step_overhead", payload)
    return payload


if __name__ == "__main__":
    main()
