"""Sizes of the three profiles: ``smoke`` (a test), ``cpu`` (about an hour on 2 cores), ``full`` (GPU)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

#: method name -> whether it uses each GuardSpace part. ``full`` trains every weight, no LoRA.
METHODS = {
    "full": dict(lora=False, subspace=False, null_space=False),
    "lora": dict(lora=True, subspace=False, null_space=False),
    "subspace": dict(lora=True, subspace=True, null_space=False),
    "nullspace": dict(lora=True, subspace=False, null_space=True),
    "guardspace": dict(lora=True, subspace=True, null_space=True),
}
CALIBRATIONS = ("raw", "template")


def variant_name(method: str, calibration: str) -> str:
    """``lora``, ``full``, or ``guardspace/template``: how a method and its calibration are named in tables."""
    return method if calibration == "-" else f"{method}/{calibration}"


@dataclass(frozen=True)
class Profile:
    name: str
    # ---- alignment (LoRA refusal patch, merged)
    align_harmful: int          # refusal_direction harmful_train instructions -> a refusal (plus align_contrast)
    align_harmless: int         # harmless_train instructions -> the original model's own answer
    align_borderline: int       # XSTest safe prompts (none evaluated) -> the original model's own answer
    align_contrast: int         # XSTest unsafe contrast prompts -> a refusal
    align_epochs: int
    align_lr: float
    align_rank: int
    align_answer_tokens: int    # new tokens of the original model's harmless answers
    # ---- attack
    n: int                      # fine-tuning samples (task + poison)
    p_grid: tuple[float, ...]
    variants: tuple[tuple[str, str], ...]   # (method, calibration); calibration "-" for full / lora
    lrs: dict[str, tuple[float, ...]]       # per method
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    max_length: int             # training sequence length (tokens)
    lora_rank: int
    lora_alpha: float
    calibration_count: int      # AdvBench prompts for the callbacks
    poison_answer_tokens: int   # new tokens of the original model's compliant answers
    # ---- evaluation
    eval_harmful: int
    val_harmful: int
    xstest_eval: int
    xstest_val: int
    gsm8k_test: int             # teacher-forced loss
    gsm8k_val: int              # validation loss (from GSM8K train, disjoint from the fine-tuning samples)
    gsm8k_accuracy: int         # exact match (greedy), a subset of the test questions
    judge_tokens: int           # new tokens generated for the keyword judge
    accuracy_tokens: int
    gen_batch_size: int
    precision_gpu: str = "bf16-mixed"
    sizes_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **kwargs: Any) -> "Profile":
        return replace(self, **{k: v for k, v in kwargs.items() if v is not None})


# LoRA's and GuardSpace's grids reach one step beyond the first CPU run's: their best validation loss sat on
# the grid's edge, which understates the utility every method is matched against.
_LORA_LRS_CPU = (1e-4, 3e-4, 1e-3, 3e-3)
# The projector slows learning (the first CPU run's null-space-only runs never reached LoRA's validation
# loss at 1e-3): its grid sits half a decade higher.
_NULLSPACE_LRS_CPU = (3e-4, 1e-3, 3e-3)
# The subspace init makes the adapter learn much faster (design note 6.2): its grid sits a decade lower.
_SUBSPACE_LRS_CPU = (1e-5, 3e-5, 1e-4, 3e-4)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", align_harmful=4, align_harmless=4, align_borderline=2, align_contrast=2, align_epochs=1, align_lr=3e-4, align_rank=8,
        align_answer_tokens=12, n=8, p_grid=(0.25,), variants=(("lora", "-"), ("guardspace", "template")),
        lrs={"lora": (1e-4, 1e-3), "guardspace": (1e-5,)}, seeds=(0,), epochs=1, batch_size=4, max_length=64,
        lora_rank=4, lora_alpha=8, calibration_count=4, poison_answer_tokens=12, eval_harmful=3, val_harmful=2,
        xstest_eval=2, xstest_val=2, gsm8k_test=2, gsm8k_val=2, gsm8k_accuracy=1, judge_tokens=8, accuracy_tokens=8,
        gen_batch_size=8, sizes_note="tiny sizes, only to check that every stage runs and writes its outputs",
    ),
    "cpu": Profile(
        name="cpu", align_harmful=64, align_harmless=160, align_borderline=128, align_contrast=64, align_epochs=3, align_lr=3e-4, align_rank=16,
        align_answer_tokens=48, n=48, p_grid=(0.2,),
        variants=(("lora", "-"), ("nullspace", "template"), ("guardspace", "template")),
        lrs={"lora": _LORA_LRS_CPU, "nullspace": _NULLSPACE_LRS_CPU, "guardspace": _SUBSPACE_LRS_CPU},
        seeds=(0, 1), epochs=2, batch_size=8, max_length=160, lora_rank=16, lora_alpha=32, calibration_count=128,
        poison_answer_tokens=48, eval_harmful=32, val_harmful=24, xstest_eval=32, xstest_val=24, gsm8k_test=24,
        gsm8k_val=16, gsm8k_accuracy=8, judge_tokens=48, accuracy_tokens=128, gen_batch_size=16,
        sizes_note="scaled down to finish in about an hour on 2 shared CPU cores (1 torch thread) in float32",
    ),
    "full": Profile(
        name="full", align_harmful=200, align_harmless=800, align_borderline=50, align_contrast=50, align_epochs=2, align_lr=2e-4, align_rank=16,
        align_answer_tokens=128, n=1000, p_grid=(0.0, 0.05, 0.1, 0.15, 0.2),
        variants=(("full", "-"), ("lora", "-"))
        + tuple((m, c) for m in ("subspace", "nullspace", "guardspace") for c in CALIBRATIONS),
        lrs={
            "full": (3e-6, 1e-5, 3e-5),
            "lora": (6e-5, 2e-4, 6e-4),
            "nullspace": (6e-5, 2e-4, 6e-4),
            "subspace": (6e-6, 2e-5, 6e-5),
            "guardspace": (6e-6, 2e-5, 6e-5),
        },
        seeds=(0, 1), epochs=2, batch_size=8, max_length=512, lora_rank=16, lora_alpha=32, calibration_count=128,
        poison_answer_tokens=128, eval_harmful=200, val_harmful=20, xstest_eval=150, xstest_val=50, gsm8k_test=200,
        gsm8k_val=100, gsm8k_accuracy=200, judge_tokens=64, accuracy_tokens=256, gen_batch_size=64,
        sizes_note="the issue's full protocol (n=1000, the paper's p grid, every method and calibration, two seeds); for a GPU",
    ),
}
