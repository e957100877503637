"""Cost of GuardSpace's setup: covariances, subspace decomposition, null-space projectors.

For every decoder block of a Llama-shaped model this times, and measures the peak memory of:

(a) covariance collection: per-sample normalised ``X^T X`` accumulated over the calibration
    tokens, with ``guardspace_pl.decomposition.sample_covariance`` exactly as the collector does,
    for the four distinct inputs of a block (attention input, o_proj input, MLP input: hidden
    features; down_proj input: MLP features). The activations are synthetic (see
    ``synthetic_activations``) and are generated before the clock starts: in a real run they come
    out of the calibration forward pass, whose cost is that of inference.
(b) the decomposition of the seven linears of a block with ``subspace_init`` (damping, float64
    SVD of ``W C~``, selection of the ``r`` smallest components, factorisation).
(c) the null-space projectors of the four distinct inputs with ``null_space_projector``.

It then compares solvers for the SVD of ``W C~`` on one module per (shape, covariance) pair:
the repository's float64 ``torch.linalg.svd`` (the reference), a float32 SVD and a float64
eigendecomposition of the Gram matrix, and reports for each the relative error of the adapter's
init product ``s * lora_B @ lora_A`` (built from the SMALLEST ``r`` components, where precision
is lost first) against the float64 reference.

``--mode full`` runs every layer; ``--mode extrapolate`` runs ``--measure-layers`` layers and
multiplies the per-layer time by the number of layers (every block has the same shapes, so the
per-layer cost is the same; the default for the llama7b profile, whose full run takes long).

Examples::

    python -m benchmarks.decomposition --profile cpu
    python -m benchmarks.decomposition --profile llama7b --device cuda            # extrapolates
    python -m benchmarks.decomposition --profile llama7b --device cuda --mode full
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from benchmarks._common import (
    LLAMA_LINEAR_INPUT,
    add_shape_arguments,
    benchmark_parser,
    current_memory,
    describe_machine,
    finish_run,
    heap_reuse,
    markdown_table,
    measure,
    median,
    memory_method,
    mib,
    shape_overrides,
    start_run,
    tensor_bytes,
    timed,
)
from guardspace_pl.decomposition import (
    PreconditionedSVD,
    adapter_from_components,
    damp_covariance,
    sample_covariance,
    select_components,
    subspace_init,
)
from guardspace_pl.null_space import null_space_projector

Factors = tuple[Tensor, Tensor, Tensor]  # U (m x k), S (k, descending), Vh (k x n)


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shapes:
    """Model shapes and calibration size of one profile."""

    hidden: int
    mlp: int
    layers: int
    rank: int
    samples: int  # calibration prompts
    tokens: int  # tokens per prompt


PROFILES: dict[str, Shapes] = {
    # Scaled down by 8 from Llama-2-7B (hidden and MLP sizes, calibration tokens): a few minutes on 2 cores.
    "cpu": Shapes(hidden=512, mlp=1376, layers=4, rank=16, samples=64, tokens=16),
    # Llama-2-7B; 520 AdvBench prompts of ~16 tokens each (raw text, as the paper calibrates).
    "llama7b": Shapes(hidden=4096, mlp=11008, layers=32, rank=128, samples=520, tokens=16),
}

# The four distinct layer inputs of a Llama block; the seven linears that read them: LLAMA_LINEAR_INPUT.
INPUTS: tuple[str, ...] = ("attn_input", "o_proj_input", "mlp_input", "down_proj_input")
# One module per distinct (weight shape, covariance) pair; the others cost the same as their representative.
REPRESENTATIVE: dict[str, str] = {
    "q_proj": "q_proj",
    "k_proj": "q_proj",
    "v_proj": "q_proj",
    "o_proj": "o_proj",
    "gate_proj": "gate_proj",
    "up_proj": "gate_proj",
    "down_proj": "down_proj",
}
SOLVER_MODULES: tuple[str, ...] = ("q_proj", "o_proj", "gate_proj", "down_proj")


def input_features(shapes: Shapes, input_name: str) -> int:
    return shapes.mlp if input_name == "down_proj_input" else shapes.hidden


def module_shape(shapes: Shapes, module: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a block's linear."""
    if module in ("gate_proj", "up_proj"):
        return shapes.mlp, shapes.hidden
    if module == "down_proj":
        return shapes.hidden, shapes.mlp
    return shapes.hidden, shapes.hidden


# --------------------------------------------------------------------------- synthetic data
def synthetic_activations(samples: int, tokens: int, features: int, seed: int, device: torch.device) -> Tensor:
    """Random activations (``samples x tokens x features``, float32) shaped like an LLM's.

    Real hidden states are far from isotropic: channel scales spread over orders of magnitude, a
    few "massive activation" channels dominate, and tokens share a handful of directions. All three
    are imitated (log-normal channel scales, 1 outlier channel per 512 at 30x, 16 shared
    directions, log-normal per-sample scale that the per-sample normalisation removes), because the
    conditioning of ``C`` decides how much precision the smallest components of ``W C~`` keep.
    """
    generator = torch.Generator().manual_seed(seed)
    channel_scale = torch.randn(features, generator=generator).exp()
    outliers = torch.randperm(features, generator=generator)[: max(1, features // 512)]
    channel_scale[outliers] *= 30.0
    shared = torch.randn(16, features, generator=generator)
    x = torch.randn(samples, tokens, features, generator=generator) * channel_scale
    x += torch.randn(samples, tokens, 16, generator=generator) @ shared
    x *= torch.randn(samples, 1, 1, generator=generator).exp()
    return x.to(device)


def synthetic_weight(out_features: int, in_features: int, seed: int, device: torch.device) -> Tensor:
    """A float32 weight with Llama's init scale (std 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    return (0.02 * torch.randn(out_features, in_features, generator=generator)).to(device)


def accumulate_covariance(activations: Tensor) -> Tensor:
    """``C = (1/N) sum_i X^_i^T X^_i`` with the repository's per-sample normalisation (float32)."""
    features = activations.shape[-1]
    covariance = torch.zeros(features, features, dtype=torch.float32, device=activations.device)
    for sample in activations:
        covariance += sample_covariance(sample, "max")
    return covariance / activations.shape[0]


def warm_up_linear_algebra(device: torch.device) -> None:
    """Load the solver libraries (cuSOLVER, MAGMA, LAPACK) before anything is timed."""
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(64, 48, dtype=dtype, device=device)
        torch.linalg.svd(a, full_matrices=False)
        torch.linalg.eigh(a.T @ a)
        torch.linalg.inv(a.T @ a + torch.eye(48, dtype=dtype, device=device))
        torch.linalg.qr(a)


# --------------------------------------------------------------------------- SVD solvers
def svd_solver(dtype: torch.dtype, driver: Optional[str] = None) -> Callable[[Tensor], Factors]:
    """``torch.linalg.svd`` in ``dtype`` (``driver`` picks the cuSOLVER routine on CUDA)."""

    def solve(m: Tensor) -> Factors:
        return torch.linalg.svd(m.to(dtype), full_matrices=False, driver=driver)

    return solve


def gram_eigh_solver(dtype: torch.dtype) -> Callable[[Tensor], Factors]:
    """SVD from ``eigh`` of the smaller Gram matrix (``M M^T`` or ``M^T M``) in ``dtype``.

    Squaring doubles the condition number's exponent, so it only suits a dtype with digits to spare.
    """

    def solve(m: Tensor) -> Factors:
        m = m.to(dtype)
        rows, cols = m.shape
        tiny = torch.finfo(dtype).tiny
        if rows <= cols:
            eigenvalues, u = torch.linalg.eigh(m @ m.T)
            s = eigenvalues.flip(0).clamp_min(0).sqrt()
            u = u.flip(1)
            return u, s, (u.T @ m) / s.clamp_min(tiny)[:, None]
        eigenvalues, v = torch.linalg.eigh(m.T @ m)
        s = eigenvalues.flip(0).clamp_min(0).sqrt()
        v = v.flip(1)
        return (m @ v) / s.clamp_min(tiny)[None, :], s, v.T

    return solve


SOLVERS: dict[str, Callable[[Tensor], Factors]] = {
    "svd64": svd_solver(torch.float64),  # the repository's path (reference)
    "svd32": svd_solver(torch.float32),
    "gram_eigh64": gram_eigh_solver(torch.float64),
    # CUDA only: an explicit cuSOLVER routine (the default tries gesvdj, then gesvd).
    "svd32_gesvd": svd_solver(torch.float32, "gesvd"),
    "svd64_gesvd": svd_solver(torch.float64, "gesvd"),
    "svd32_gesvdj": svd_solver(torch.float32, "gesvdj"),
}
DEFAULT_SOLVERS: tuple[str, ...] = ("svd64", "svd32", "gram_eigh64")


def adapter_product(factors: Factors, inverse: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """``s * lora_B @ lora_A`` of the ``rank`` smallest components, and their singular values (float64).

    Uses the repository's ``select_components`` and ``adapter_from_components``; ``V~ = V^T C~^-1``
    is formed for the kept rows only.
    """
    u, s, vh = (t.double() for t in factors)
    kept = select_components(PreconditionedSVD(U=u, S=s, Vt_tilde=vh, damp=0.0), rank, "kpa")
    kept = replace(kept, Vt_tilde=kept.Vt_tilde @ inverse)
    lora_A, lora_B = adapter_from_components(kept, scaling)
    return scaling * (lora_B @ lora_A), kept.S


# --------------------------------------------------------------------------- phases
@dataclass
class Record:
    """One measured call."""

    phase: str
    item: str
    layer: int
    shape: str
    seconds: float
    peak_bytes: int  # absolute peak during the call
    delta_bytes: int  # peak above the level at the call's start
    extra: dict[str, Any]


def run_phases(
    shapes: Shapes,
    layers_to_run: int,
    activations: dict[str, Tensor],
    weights: dict[str, Tensor],
    scaling: float,
    null_threshold: float,
    device: torch.device,
) -> tuple[list[Record], dict[str, int], list[dict[str, Tensor]]]:
    """Phases (a), (b), (c) on ``layers_to_run`` blocks.

    All covariances are kept until the end, as the callbacks keep them: their storage is part of
    the memory a real run needs. Returns the records, each phase's peak above its starting level,
    and the covariances.
    """
    records: list[Record] = []
    phase_delta: dict[str, int] = {}
    covariances: list[dict[str, Tensor]] = []

    start = current_memory(device)
    for layer in range(layers_to_run):
        covariances.append({})
        for name in INPUTS:
            n = input_features(shapes, name)
            cov, seconds, memory = measure(lambda: accumulate_covariance(activations[name]), device)
            covariances[layer][name] = cov
            tokens = activations[name].shape[0] * activations[name].shape[1]
            records.append(
                Record(
                    "covariance", name, layer, f"{tokens} tok x {n}", seconds, memory.peak_bytes, memory.delta_bytes, {}
                )
            )
    phase_delta["covariance"] = max(r.peak_bytes for r in records if r.phase == "covariance") - start

    start = current_memory(device)
    for layer in range(layers_to_run):
        for module, input_name in LLAMA_LINEAR_INPUT.items():
            m, n = module_shape(shapes, module)
            init, seconds, memory = measure(
                lambda: subspace_init(weights[module], covariances[layer][input_name], shapes.rank, scaling), device
            )
            records.append(
                Record(
                    "decomposition",
                    module,
                    layer,
                    f"{m} x {n}",
                    seconds,
                    memory.peak_bytes,
                    memory.delta_bytes,
                    {"damp": init.damp},
                )
            )
            del init
    phase_delta["decomposition"] = max(r.peak_bytes for r in records if r.phase == "decomposition") - start

    start = current_memory(device)
    for layer in range(layers_to_run):
        for name in INPUTS:
            n = input_features(shapes, name)
            projector, seconds, memory = measure(
                lambda: null_space_projector(covariances[layer][name], threshold=null_threshold), device
            )
            extra = {
                "null_dim": projector.null_dim,
                "stored_basis_columns": projector.basis.shape[1],
                "basis_bytes": tensor_bytes(projector.basis),
            }
            records.append(
                Record("null_space", name, layer, f"{n} x {n}", seconds, memory.peak_bytes, memory.delta_bytes, extra)
            )
            del projector
    phase_delta["null_space"] = max(r.peak_bytes for r in records if r.phase == "null_space") - start
    return records, phase_delta, covariances


def compare_solvers(
    shapes: Shapes,
    covariances: dict[str, Tensor],
    weights: dict[str, Tensor],
    solvers: Sequence[str],
    scaling: float,
    repeats: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Time every solver on each representative module (median of ``repeats``) and measure its adapter-init error.

    Also times the rest of the repository's float64 path (damping with its inverse, ``W C~``, and
    ``V~ = V^T C~^-1`` over all ``k`` rows as ``preconditioned_svd`` does), to show where time goes.
    """
    rows: list[dict[str, Any]] = []
    for module in SOLVER_MODULES:
        m, n = module_shape(shapes, module)
        weight, cov = weights[module], covariances[LLAMA_LINEAR_INPUT[module]]
        damped, damp_s, _ = measure(lambda: damp_covariance(cov), device)
        product, product_s, _ = measure(lambda: weight.double() @ damped.matrix, device)
        reference = SOLVERS["svd64"](product)
        _, vtilde_s, _ = measure(lambda: reference[2] @ damped.inverse, device)
        ref_adapter, ref_kept = adapter_product(reference, damped.inverse, shapes.rank, scaling)
        cov_eigenvalues = torch.linalg.eigvalsh(damped.matrix)
        common = {
            "module": module,
            "shape": f"{m} x {n}",
            "cond_C_damped": (cov_eigenvalues[-1] / cov_eigenvalues[0]).item(),
            "cond_WC": (reference[1][0] / reference[1][-1]).item(),
            "damp": damped.damp,
            "damp_covariance_s": damp_s,
            "w_times_c_s": product_s,
            "vtilde_all_rows_s": vtilde_s,
        }
        for solver in solvers:
            factors, seconds, memory = measure(lambda: SOLVERS[solver](product), device)
            with heap_reuse(device):
                seconds = median(
                    [seconds] + [timed(lambda: SOLVERS[solver](product), device)[1] for _ in range(repeats - 1)]
                )
            adapter, kept = adapter_product(factors, damped.inverse, shapes.rank, scaling)
            rows.append(
                {
                    **common,
                    "solver": solver,
                    "svd_s": seconds,
                    "svd_delta_bytes": memory.delta_bytes,
                    "adapter_rel_error": ((adapter - ref_adapter).norm() / ref_adapter.norm()).item(),
                    "kept_sv_max_rel_error": ((kept - ref_kept).abs() / ref_kept).max().item(),
                    "finite": bool(torch.isfinite(adapter).all()),
                }
            )
            del factors, adapter
        del damped, product, reference
    return rows


# --------------------------------------------------------------------------- summaries
def summarise_items(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Median seconds over layers (robust to other jobs' bursts) and worst peak per (phase, item)."""
    keys = list(dict.fromkeys((r.phase, r.item) for r in records))
    out = []
    for phase, item in keys:
        rs = [r for r in records if (r.phase, r.item) == (phase, item)]
        row = {
            "phase": phase,
            "item": item,
            "shape": rs[0].shape,
            "seconds_per_layer": median([r.seconds for r in rs]),
            "delta_bytes": max(r.delta_bytes for r in rs),
            **rs[0].extra,
        }
        out.append(row)
    return out


def summarise_phases(
    records: Sequence[Record],
    items: Sequence[dict[str, Any]],
    phase_delta: dict[str, int],
    total_layers: int,
    mode: str,
) -> list[dict[str, Any]]:
    """Per-layer time of each phase (sum of its items' medians) and whole-model time.

    The whole-model time is the measured sum in full mode, per-layer time x layers otherwise.
    """
    out = []
    for phase in ("covariance", "decomposition", "null_space"):
        per_layer = sum(i["seconds_per_layer"] for i in items if i["phase"] == phase)
        measured = sum(r.seconds for r in records if r.phase == phase)
        layers_run = len({r.layer for r in records if r.phase == phase})
        out.append(
            {
                "phase": phase,
                "seconds_per_layer": per_layer,
                "seconds_total": measured if mode == "full" else per_layer * total_layers,
                "total_is": "measured" if mode == "full" else f"extrapolated from {layers_run} layer(s)",
                "peak_delta_bytes": phase_delta[phase],
            }
        )
    return out


def summarise_solvers(
    rows: Sequence[dict[str, Any]], total_layers: int, tolerance: float
) -> tuple[list[dict[str, Any]], Optional[str]]:
    """Per solver: SVD seconds for a whole block (k, v and up cost as q and gate), model total, worst error.

    Recommends the fastest solver whose adapter product and kept singular values are all within
    ``tolerance`` (relative) of the float64 SVD's.
    """
    summary = []
    for solver in dict.fromkeys(r["solver"] for r in rows):
        by_module = {r["module"]: r for r in rows if r["solver"] == solver}
        per_layer = sum(by_module[REPRESENTATIVE[module]]["svd_s"] for module in LLAMA_LINEAR_INPUT)
        summary.append(
            {
                "solver": solver,
                "svd_seconds_per_layer": per_layer,
                "svd_seconds_total": per_layer * total_layers,
                "worst_adapter_rel_error": max(r["adapter_rel_error"] for r in by_module.values()),
                "worst_kept_sv_rel_error": max(r["kept_sv_max_rel_error"] for r in by_module.values()),
                "all_finite": all(r["finite"] for r in by_module.values()),
            }
        )
    accurate = [
        s
        for s in summary
        if s["all_finite"] and max(s["worst_adapter_rel_error"], s["worst_kept_sv_rel_error"]) <= tolerance
    ]
    best = min(accurate, key=lambda s: s["svd_seconds_per_layer"])["solver"] if accurate else None
    return summary, best


def storage(shapes: Shapes, items: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Bytes a whole-model run keeps: every layer's float32 covariances, and the stored null bases."""
    covariance = shapes.layers * sum(input_features(shapes, name) ** 2 * 4 for name in INPUTS)
    bases = shapes.layers * sum(i["basis_bytes"] for i in items if i["phase"] == "null_space")
    dense = shapes.layers * sum(module_shape(shapes, m)[1] ** 2 * 4 for m in LLAMA_LINEAR_INPUT)
    return {
        "covariances_all_layers_bytes": covariance,
        "null_bases_all_layers_bytes": bases,
        "dense_P_per_module_all_layers_bytes": dense,
    }


def render(
    shapes: Shapes,
    items: Sequence[dict[str, Any]],
    phases: Sequence[dict[str, Any]],
    solver_rows: Sequence[dict[str, Any]],
    solver_summary: Sequence[dict[str, Any]],
    best: Optional[str],
    store: dict[str, int],
    tolerance: float,
) -> str:
    """The printed report (Markdown)."""
    phase_table = markdown_table(
        ["phase", "s / layer", f"s, {shapes.layers} layers", "total", "peak above start (MiB)"],
        [
            [
                p["phase"],
                f"{p['seconds_per_layer']:.3f}",
                f"{p['seconds_total']:.2f}",
                p["total_is"],
                f"{mib(p['peak_delta_bytes']):.1f}",
            ]
            for p in phases
        ],
    )
    item_table = markdown_table(
        ["phase", "item", "shape", "ms / layer", "peak above start (MiB)", "notes"],
        [
            [
                i["phase"],
                i["item"],
                i["shape"],
                f"{1e3 * i['seconds_per_layer']:.1f}",
                f"{mib(i['delta_bytes']):.1f}",
                (
                    f"null dim {i['null_dim']}, basis {i['stored_basis_columns']} cols"
                    if i["phase"] == "null_space"
                    else (f"damp {i['damp']:g}" if "damp" in i else "")
                ),
            ]
            for i in items
        ],
    )
    solver_table = markdown_table(
        [
            "module",
            "shape",
            "cond(C~)",
            "cond(W C~)",
            "solver",
            "SVD ms",
            "rel. err. s·B@A (r smallest)",
            "max rel. err. kept σ",
        ],
        [
            [
                r["module"],
                r["shape"],
                f"{r['cond_C_damped']:.1e}",
                f"{r['cond_WC']:.1e}",
                r["solver"],
                f"{1e3 * r['svd_s']:.1f}",
                f"{r['adapter_rel_error']:.1e}",
                f"{r['kept_sv_max_rel_error']:.1e}",
            ]
            for r in solver_rows
        ],
    )
    breakdown_rows = {r["module"]: r for r in solver_rows}.values()
    breakdown_table = markdown_table(
        ["module", "damp_covariance (f64 inv + check) ms", "W C~ (f64) ms", "V^T C~^-1, all k rows (f64) ms"],
        [
            [
                r["module"],
                f"{1e3 * r['damp_covariance_s']:.1f}",
                f"{1e3 * r['w_times_c_s']:.1f}",
                f"{1e3 * r['vtilde_all_rows_s']:.1f}",
            ]
            for r in breakdown_rows
        ],
    )
    summary_table = markdown_table(
        [
            "solver",
            "SVD s / layer",
            f"SVD s, {shapes.layers} layers",
            "worst rel. err. s·B@A",
            "worst rel. err. kept σ",
        ],
        [
            [
                s["solver"],
                f"{s['svd_seconds_per_layer']:.3f}",
                f"{s['svd_seconds_total']:.2f}",
                f"{s['worst_adapter_rel_error']:.1e}",
                f"{s['worst_kept_sv_rel_error']:.1e}",
            ]
            for s in solver_summary
        ],
    )
    pick = (
        f"Fastest solver with adapter and kept-σ relative errors <= {tolerance:g}: {best}"
        if best
        else f"No solver met the adapter-error tolerance {tolerance:g}."
    )
    storage_lines = "\n".join(f"- {k}: {mib(v):.1f} MiB" for k, v in store.items())
    return (
        f"## Phases\n\n{phase_table}\n\n## Per item (one layer)\n\n{item_table}\n\n"
        f"## SVD of W C~: solvers (layer 0)\n\n{solver_table}\n\n{summary_table}\n\n{pick}\n\n"
        f"## Rest of the float64 path (layer 0)\n\n{breakdown_table}\n\n"
        f"## Storage for all {shapes.layers} layers (float32)\n\n{storage_lines}"
    )


# --------------------------------------------------------------------------- entry point
SHAPE_FIELDS = ("layers", "hidden", "mlp", "rank", "samples", "tokens")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, PROFILES, "decomposition")
    parser.add_argument(
        "--mode",
        choices=("auto", "full", "extrapolate"),
        default="auto",
        help="auto: full for cpu, extrapolate for llama7b",
    )
    parser.add_argument("--measure-layers", type=int, default=1, help="layers run in extrapolate mode")
    add_shape_arguments(parser, *SHAPE_FIELDS)
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 r, so s = 2)")
    parser.add_argument(
        "--null-threshold", type=float, default=1e-6, help="relative eigenvalue threshold of the null space"
    )
    parser.add_argument("--solvers", nargs="+", choices=sorted(SOLVERS), help=f"default: {' '.join(DEFAULT_SOLVERS)}")
    parser.add_argument("--solver-repeats", type=int, default=3, help="timed runs per solver and module (median)")
    parser.add_argument(
        "--error-tolerance",
        type=float,
        default=1e-3,
        help="largest relative error (adapter product, kept σ) of a recommended solver",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, env = start_run(args)
    shapes = replace(PROFILES[args.profile], **shape_overrides(args, *SHAPE_FIELDS))
    mode = args.mode if args.mode != "auto" else ("full" if args.profile == "cpu" else "extrapolate")
    layers_to_run = shapes.layers if mode == "full" else min(args.measure_layers, shapes.layers)
    scaling = (args.lora_alpha if args.lora_alpha is not None else 2.0 * shapes.rank) / shapes.rank
    solvers = list(args.solvers or DEFAULT_SOLVERS)
    if device.type != "cuda":
        solvers = [s for s in solvers if not s.endswith(("_gesvd", "_gesvdj"))]
    print(f"decomposition benchmark, profile {args.profile}, mode {mode}: {shapes}\n{describe_machine(env)}\n")

    warm_up_linear_algebra(device)
    activations = {
        name: synthetic_activations(shapes.samples, shapes.tokens, input_features(shapes, name), args.seed + i, device)
        for i, name in enumerate(INPUTS)
    }
    weights = {
        module: synthetic_weight(*module_shape(shapes, module), args.seed + 100 + i, device)
        for i, module in enumerate(LLAMA_LINEAR_INPUT)
    }

    records, phase_delta, covariances = run_phases(
        shapes, layers_to_run, activations, weights, scaling, args.null_threshold, device
    )
    solver_rows = compare_solvers(shapes, covariances[0], weights, solvers, scaling, args.solver_repeats, device)

    items = summarise_items(records)
    phases = summarise_phases(records, items, phase_delta, shapes.layers, mode)
    solver_summary, best = summarise_solvers(solver_rows, shapes.layers, args.error_tolerance)
    store = storage(shapes, items)
    print(render(shapes, items, phases, solver_rows, solver_summary, best, store, args.error_tolerance))

    payload = {
        "benchmark": "decomposition",
        "profile": args.profile,
        "mode": mode,
        "layers_run": layers_to_run,
        "shapes": asdict(shapes),
        "scaling": scaling,
        "null_threshold": args.null_threshold,
        "memory_method": memory_method(device),
        "environment": env,
        "phases": phases,
        "items": items,
        "solvers": solver_rows,
        "solver_summary": solver_summary,
        "recommended_solver": best,
        "error_tolerance": args.error_tolerance,
        "storage": store,
        "records": [asdict(r) for r in records],
    }
    finish_run(args, "decomposition", payload)
    return payload


if __name__ == "__main__":
    main()
