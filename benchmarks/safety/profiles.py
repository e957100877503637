"""Sizes of the three profiles: ``smoke`` (a test), ``cpu`` (hours on 2 cores, resumable), ``full`` (GPU).

A *variant* is what a table row names: a training method, with its calibration set where it has one
(``nullspace/template``), or a LoRA run followed by a post-hoc method (``lora+safelora``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Method:
    """Which library parts one training method uses. ``full`` trains every weight and no LoRA."""

    lora: bool = True
    subspace: bool = False     # SafetySubspaceInit
    null_space: bool = False   # NullSpaceProjection
    asft: bool = False         # AsFTRegularizer (reference: the aligned start's safety patch)
    spf: bool = False          # SafetyGradientProjection
    calibrated: bool = False   # takes a calibration set (the GuardSpace callbacks)


METHODS: dict[str, Method] = {
    "full": Method(lora=False),
    "lora": Method(),
    "nullspace": Method(null_space=True, calibrated=True),
    "guardspace": Method(subspace=True, null_space=True, calibrated=True),
    "asft": Method(asft=True),
    "spf": Method(spf=True),
    "nullspace+spf": Method(null_space=True, spf=True, calibrated=True),
}

#: Applied after training to every plain LoRA run (so they cost no training): variant ``lora+<method>``. A name
#: ``<method>-<setting>`` is one more point of that method's grid, chosen with the lrs at matched utility:
#: SafeLoRA in threshold mode (tau = 0.5, the spec's tau) or ``k10`` (number mode, K = 10, the spec's default);
#: LSSF at alpha = 1 (the paper's) or ``a4`` (alpha = 4: a rank-8 patch's projected fold is small).
POSTHOC = ("safelora", "safelora-k10", "lssf", "lssf-a4", "patch")
POSTHOC_SETTINGS: dict[str, dict[str, Any]] = {
    "safelora": {"mode": "threshold", "threshold": 0.5},
    "safelora-k10": {"mode": "number", "num_projected_modules": 10},
    "lssf": {"alpha": 1.0}, "lssf-a4": {"alpha": 4.0}, "patch": {},
}

#: Calibration sets of the GuardSpace callbacks (``splits.calibration``): name -> (prompt format, set).
CALIBRATIONS: dict[str, tuple[str, str]] = {
    "template": ("chat_template", "advbench"),        # AdvBench only, in the chat template (the benchmark's default)
    "raw": ("raw", "advbench"),                       # the paper's raw text
    "mixed": ("chat_template", "mixed"),              # AdvBench + HarmBench + harmful_train, same count
    "mixed_large": ("chat_template", "mixed_large"),  # the mixed set at its larger count
}


def variant_name(
    method: str,
    calibration: str = "-",
    posthoc: str = "-",
    weight: float | None = None,
    refresh_every: int | None = None,
) -> str:
    """``lora``, ``nullspace/template``, ``lora+safelora``, ``asft(l=10)``, ``spf(r=10)``: how a run is named in
    tables."""
    name = method if calibration == "-" else f"{method}/{calibration}"
    if posthoc != "-":
        name += f"+{posthoc.split('-')[0]}"
    if weight is not None and weight != 1.0:
        name += f"(l={weight:g})"
    if refresh_every is not None and refresh_every != 1:
        name += f"(r={refresh_every})"
    return name


@dataclass(frozen=True)
class Profile:
    name: str
    # ---- alignment: the `align` workflow with configs/safety_patch_smollm2.yaml and these dotted overrides
    align_overrides: dict[str, Any]
    # ---- attack
    n: int                                      # fine-tuning samples (task + poison)
    p_grid: tuple[float, ...]
    variants: tuple[tuple[str, str], ...]       # (method, calibration); calibration "-" without one
    lrs: dict[str, tuple[float, ...]]           # per method
    epochs: int
    batch_size: int
    max_length: int                             # training sequence length (tokens)
    lora_rank: int
    lora_alpha: float
    seeds: tuple[int, ...] = (0, 1)             # every matched pick is trained and evaluated with each
    coverage: tuple[str, ...] = ()              # extra null-space calibrations (the coverage study) ...
    coverage_p: float = 0.2                     # ... and SPF's slower refreshes (spf_refresh) run at this p only
    asft_weights: tuple[float, ...] = (0.1, 1.0, 10.0)  # lambda; the lr grid runs at 1, the others at its pick
    # SPF's refresh_every; the lr grid runs at 1, these at its pick. 10 lost SPF's protection at the CPU attack's 12
    # steps (validation harmful 60 % vs 17.5 % at 1): 2 and 5 find where it holds (cost ~1.12x and ~1.06x at the CPU
    # shape by #13's step-overhead parts).
    spf_refresh: tuple[int, ...] = (2, 5, 10, 25)
    grid_refinements: int = 1                   # 1: a grid with no matched point gains the midpoints around its best
    grid_extensions: int = 2                    # a grid whose best validation loss is its top lr grows by x3,
                                                # this often
    posthoc: tuple[str, ...] = POSTHOC
    calibration_count: int = 128                # AdvBench prompts for the callbacks (and the mixed set)
    calibration_count_large: int = 384          # the mixed set's larger count
    poison_answer_tokens: int = 48              # new tokens of the original model's compliant answers
    spf_samples: int = 8                        # SPF safety pairs (harmful prompt + refusal)
    lssf_anchors: int = 32                      # LSSF anchor prompts (the aligned model's refusals)
    lssf_tokens: int = 32
    # ---- evaluation (full: every matched pick; validation: every run)
    eval_sizes: dict[str, int] = field(default_factory=dict)  # harmbench, advbench, xstest, harmless
    val_sizes: dict[str, int] = field(default_factory=dict)
    gsm8k_test: int = 50                        # teacher-forced loss
    gsm8k_accuracy: int = 50                    # exact match (greedy), the first of the test questions
    gsm8k_val: int = 16                         # validation loss (GSM8K train, disjoint from the fine-tuning samples)
    judge_tokens: int = 48
    accuracy_tokens: int = 128
    gen_batch_size: int = 16
    precision_gpu: str = "bf16-mixed"
    sizes_note: str = ""

    def __post_init__(self) -> None:
        methods = {m for m, _ in self.variants} | ({"nullspace"} if self.coverage else set())
        for method in methods:
            if method not in METHODS:
                raise ValueError(f"Profile {self.name}: unknown method {method!r}; one of {sorted(METHODS)}.")
            if not self.lrs.get(method):
                raise ValueError(f"Profile {self.name}: no learning rates for {method!r} (lrs).")
        for method, calibration in self.variants:
            if (calibration != "-") != METHODS[method].calibrated or (
                calibration != "-" and calibration not in CALIBRATIONS
            ):
                raise ValueError(f"Profile {self.name}: {method!r} with calibration {calibration!r}.")
        unknown = set(self.posthoc) - set(POSTHOC_SETTINGS)
        if unknown:
            raise ValueError(
                f"Profile {self.name}: unknown post-hoc settings {sorted(unknown)}; one of {sorted(POSTHOC_SETTINGS)}."
            )
        if "lora" not in methods:
            raise ValueError(f"Profile {self.name}: matched utility needs the plain 'lora' variant.")
        if any(not isinstance(r, int) or r < 1 for r in self.spf_refresh):
            raise ValueError(f"Profile {self.name}: spf_refresh holds refresh intervals (integers >= 1).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **kwargs: Any) -> "Profile":
        return replace(self, **{k: v for k, v in kwargs.items() if v is not None})


_ALL_VARIANTS = (
    ("full", "-"), ("lora", "-"), ("nullspace", "template"), ("guardspace", "template"), ("asft", "-"), ("spf", "-"),
    ("nullspace+spf", "template"),
)
_EVAL = {"harmbench": 100, "advbench": 100, "xstest": 100, "harmless": 100}
_VAL = {"harmbench": 20, "advbench": 20, "xstest": 30, "harmless": 30}

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        align_overrides={"data.harmful.0.count": 4, "data.contrast.0.count": 2, "data.harmless.0.count": 4,
                         "data.borderline.0.count": 2, "data.answer_tokens": 12, "trainer.max_epochs": 1},
        n=8, p_grid=(0.25,),
        variants=(("lora", "-"), ("guardspace", "template"), ("asft", "-"), ("nullspace+spf", "template")),
        lrs={
            "lora": (1e-4, 1e-3),
            "nullspace": (1e-3,),
            "guardspace": (1e-5,),
            "asft": (1e-3,),
            "nullspace+spf": (1e-3,),
        },
        seeds=(0, 1), coverage=("mixed",), coverage_p=0.25, posthoc=("safelora-k10", "lssf-a4", "patch"),
        asft_weights=(1.0, 10.0), spf_refresh=(), grid_extensions=0, grid_refinements=0, epochs=1, batch_size=4,
        max_length=64,
        lora_rank=4, lora_alpha=8, calibration_count=4, calibration_count_large=6, poison_answer_tokens=12,
        spf_samples=2, lssf_anchors=2, lssf_tokens=8,
        eval_sizes={"harmbench": 2, "advbench": 2, "xstest": 2, "harmless": 2},
        val_sizes={"harmbench": 1, "advbench": 1, "xstest": 1, "harmless": 1}, gsm8k_test=2, gsm8k_accuracy=1,
        gsm8k_val=2, judge_tokens=8, accuracy_tokens=8, gen_batch_size=8,
        sizes_note="tiny sizes, only to check that every stage runs and writes its outputs",
    ),
    "cpu": Profile(
        name="cpu", align_overrides={},
        n=48, p_grid=(0.2, 0.0), variants=_ALL_VARIANTS,
        lrs={
            "full": (1e-5, 3e-5, 1e-4),
            "lora": (1e-4, 3e-4, 1e-3, 3e-3),
            "nullspace": (3e-4, 1e-3, 3e-3),
            "guardspace": (1e-5, 3e-5, 1e-4, 3e-4),  # the subspace init learns a decade faster (design note 6.2)
            "asft": (3e-4, 1e-3, 3e-3),
            "spf": (3e-4, 1e-3, 3e-3),
            "nullspace+spf": (3e-4, 1e-3, 3e-3),
        },
        coverage=("mixed", "mixed_large", "raw"), epochs=2, batch_size=8, max_length=160, lora_rank=16, lora_alpha=32,
        eval_sizes=_EVAL, val_sizes=_VAL,
        sizes_note=(
            "the attack scaled down to n=48 to finish in hours on 2 shared CPU cores (1 torch thread) in float32"
        ),
    ),
    "full": Profile(
        name="full", align_overrides={},
        n=1000, p_grid=(0.0, 0.05, 0.1, 0.15, 0.2), variants=_ALL_VARIANTS,
        lrs={
            "full": (3e-6, 1e-5, 3e-5),
            "lora": (6e-5, 2e-4, 6e-4),
            "nullspace": (6e-5, 2e-4, 6e-4),
            "guardspace": (6e-6, 2e-5, 6e-5),
            "asft": (6e-5, 2e-4, 6e-4),
            "spf": (6e-5, 2e-4, 6e-4),
            "nullspace+spf": (6e-5, 2e-4, 6e-4),
        },
        coverage=("mixed", "mixed_large", "raw"), epochs=2, batch_size=8, max_length=512, lora_rank=16, lora_alpha=32,
        poison_answer_tokens=128, eval_sizes={"harmbench": 100, "advbench": 100, "xstest": 100, "harmless": 100},
        val_sizes={"harmbench": 20, "advbench": 20, "xstest": 50, "harmless": 50}, gsm8k_test=200, gsm8k_accuracy=200,
        gsm8k_val=100, judge_tokens=64, accuracy_tokens=256, gen_batch_size=64,
        sizes_note="the paper-scale attack (n=1000, the paper's p grid, every method); for a GPU",
    ),
}
