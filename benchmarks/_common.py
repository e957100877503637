"""Helpers shared by the benchmark scripts: device and profile choice, timing, peak memory, output.

Peak memory is measured the way each device allows:

* CUDA: ``torch.cuda.max_memory_allocated`` (every tensor the caching allocator handed out,
  cuSOLVER/cuBLAS workspaces included), reset at the start of the measured region.
* CPU: the process's resident set size (RSS), sampled every millisecond by a background thread
  with ``psutil``. ``tracemalloc`` does not see torch's allocations and ``getrusage`` only gives
  the peak of the whole process lifetime. glibc keeps freed memory in its heap, where RSS cannot
  tell it from live tensors, so CPU runs start with every allocation of 64 KiB or more getting its
  own mapping (``mallopt(M_MMAP_THRESHOLD)``), returned to the OS when freed: RSS then follows the
  live tensors. Those mappings make allocation-heavy code slower (a training step by ~20% here,
  the covariance loop by 2x), so timed code runs inside ``heap_reuse()``, with glibc's usual heap
  reuse, and on the CPU ``measure`` runs a function twice: once watched, once timed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

from guardspace_pl.io import write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 1024**2
T = TypeVar("T")

#: the tensor each linear of a Llama decoder block reads; linears that read the same one share its covariance
#: (and null space)
LLAMA_LINEAR_INPUT: dict[str, str] = {
    "q_proj": "attn_input",
    "k_proj": "attn_input",
    "v_proj": "attn_input",
    "o_proj": "o_proj_input",
    "gate_proj": "mlp_input",
    "up_proj": "mlp_input",
    "down_proj": "down_proj_input",
}


# --------------------------------------------------------------------------- device and profile
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when it is available, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
    return device


def default_profile() -> str:
    """The full-size profile on a GPU, the scaled-down one otherwise."""
    return "llama7b" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock times cover the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None:  # glibc only (not musl or macOS): nothing to trim elsewhere
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _set_mmap_threshold(num_bytes: int) -> None:
    """Allocations of at least ``num_bytes`` get their own mapping, returned to the OS on free (glibc)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, num_bytes)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * num_bytes)


TRACKING_MMAP_THRESHOLD = 64 * 1024  # RSS follows live tensors
HEAP_REUSE_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest dynamic threshold: heap reuse


@contextlib.contextmanager
def heap_reuse(device: torch.device) -> Iterator[None]:
    """Time allocation-heavy loops with glibc's usual heap reuse (CPU); memory tracking resumes after.

    Measure no memory inside: RSS keeps freed heap memory and would overstate it.
    """
    if device.type == "cuda":
        yield
        return
    _set_mmap_threshold(HEAP_REUSE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _set_mmap_threshold(TRACKING_MMAP_THRESHOLD)
        release_memory(device)


def release_memory(device: torch.device) -> None:
    """Collect garbage; on the CPU also hand freed heap memory back to the OS (glibc).

    glibc does not return a freed heap on its own: a safety-benchmark worker that had trained and evaluated two
    models held 7.8 GB, 4.1 GB after ``malloc_trim``. The CUDA cache is left alone: ``max_memory_allocated`` counts
    live tensors, not the cache, and emptying it would add ``cudaMalloc`` calls to the timed code.
    """
    gc.collect()
    if device.type != "cuda":
        _malloc_trim()


@functools.lru_cache(maxsize=None)
def _this_process(pid: int):
    import psutil  # a dependency of peft and accelerate, so present wherever peft is

    return psutil.Process(pid)


def process_rss() -> int:
    """Resident set size of this process, in bytes."""
    return _this_process(os.getpid()).memory_info().rss


def current_memory(device: torch.device) -> int:
    """Bytes in use now, after releasing garbage: allocated GPU tensors on CUDA, process RSS on the CPU."""
    release_memory(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else process_rss()


# --------------------------------------------------------------------------- timing
def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``fn`` once and return its result and its wall-clock seconds (synchronised on CUDA)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def repeat_timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device)[1] for _ in range(repeats)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Context manager measuring the peak memory of the code it wraps.

    ``peak_bytes`` is the absolute peak (GPU tensors on CUDA, process RSS on the CPU) and
    ``delta_bytes`` the peak above the level at entry: what the wrapped code added. On the CPU do
    not time the code inside (the sampler thread competes with it), and know that peaks shorter
    than the sampling interval can be missed.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.001) -> None:
        self.device = device
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, process_rss())

    def __enter__(self) -> "PeakMemory":
        release_memory(self.device)
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline_bytes = process_rss()
            self.peak_bytes = self.baseline_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, process_rss())


def memory_method(device: torch.device) -> str:
    """How ``PeakMemory`` measures on ``device`` (for the JSON output)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "process RSS sampled with psutil every 1 ms (glibc mmap threshold 64 KiB), on a separate untimed run"


def measure(fn: Callable[[], T], device: torch.device) -> tuple[T, float, PeakMemory]:
    """Run ``fn``: its result, its seconds and its peak memory.

    On CUDA one call gives both. On the CPU ``fn`` runs twice: first under ``PeakMemory`` (result
    dropped), then timed inside ``heap_reuse``, so that neither the sampler thread nor the
    memory-tracking allocator setting slows the timed run.
    """
    if device.type == "cuda":
        with PeakMemory(device) as memory:
            result, seconds = timed(fn, device)
        return result, seconds, memory
    with PeakMemory(device) as memory:
        fn()
    with heap_reuse(device):
        result, seconds = timed(fn, device)
    return result, seconds, memory


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mib(num_bytes: float) -> float:
    return num_bytes / MIB


# --------------------------------------------------------------------------- environment and output
def cpu_model_name() -> str:
    """The CPU's model name as ``lscpu`` reports it (``/proc/cpuinfo`` as a fallback)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def add_common_arguments(parser: argparse.ArgumentParser, profiles: Sequence[str], script: str) -> None:
    """Flags both benchmarks share: profile, device, threads, seed, output."""
    parser.add_argument(
        "--profile", choices=sorted(profiles), default=default_profile(),
        help="default: llama7b when CUDA is available, else cpu",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice). On a CPU other jobs share, 1 thread avoids "
        "OpenMP oversubscription, which can slow every op down by 10-100x.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help=f"JSON output (default benchmarks/results/{script}_<profile>.json)")


# What each shape flag overrides in a profile's dataclass (the flag is the field's name).
SHAPE_FLAGS = {
    "layers": "the number of decoder layers (fewer if memory is tight)",
    "hidden": "the hidden size",
    "mlp": "the MLP size",
    "heads": "the attention heads (and KV heads)",
    "batch": "the batch size",
    "seq": "the sequence length",
    "rank": "the LoRA rank",
    "samples": "the number of calibration prompts",
    "tokens": "the tokens per calibration prompt",
}


def add_shape_arguments(parser: argparse.ArgumentParser, *fields: str) -> None:
    """``--<field>`` integer flags that override the chosen profile's shape (see ``shape_overrides``)."""
    for field in fields:
        parser.add_argument(f"--{field}", type=int, help=f"override {SHAPE_FLAGS[field]}")


def shape_overrides(args: argparse.Namespace, *fields: str) -> dict[str, int]:
    """The shape flags given on the command line, as ``dataclasses.replace`` keyword arguments."""
    return {field: getattr(args, field) for field in fields if getattr(args, field) is not None}


def benchmark_parser(doc: str, profiles: Sequence[str], script: str) -> argparse.ArgumentParser:
    """A benchmark script's parser: the first paragraph of its docstring ``doc`` as description, then the common
    flags."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, profiles, script)
    return parser


def start_run(args: argparse.Namespace) -> tuple[torch.device, dict[str, Any]]:
    """Apply ``--threads`` and ``--device``; return the device and the environment record."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type != "cuda":
        _set_mmap_threshold(TRACKING_MMAP_THRESHOLD)  # before anything is allocated: keeps the heap compact
    return device, environment(device)


def finish_run(args: argparse.Namespace, script: str, payload: dict[str, Any]) -> None:
    """Add the load average at the end (other jobs on the machine skew CPU timings) and write the JSON."""
    payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    path = write_json(args.out or default_output(script, args.profile), payload)
    print(f"\nWrote {repo_relative(path)}")


def describe_machine(env: dict[str, Any]) -> str:
    """One line for a report header."""
    where = env.get("gpu") or f"{env['cpu_count']}-core CPU ({env['cpu_model']}), {env['torch_threads']} torch threads"
    return f"{where}; torch {env['torch']}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def default_output(script: str, profile: str) -> Path:
    return RESULTS_DIR / f"{script}_{profile}.json"


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (results then hold no machine's folders)."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)
