"""The safety reference: per adapted module, the alignment vector ``V = W_aligned - W_base``.

SafeLoRA, AsFT and LSSF all start from it (design spec SAFETY_METHODS.md, section 0). Two sources:

- two checkpoints (``from_checkpoints``): ``V`` is read lazily, one module at a time, tensor by tensor with
  ``safetensors.safe_open``; two 7B models never sit in memory, only the two tensors of the module at hand.
- a safety-patch adapter (``from_patch_adapter``): ``V = s B A`` kept factored (``left = s B``, ``right = A``).

Vectors are matched to LoRA layers by module name inside the Hugging Face model (``LoraTarget.hf_name``), never by
parameter order. The small API the methods use:

- ``reference.for_targets(targets)``: checks shapes and coverage at once (metadata only), then yields
  ``(target, AlignmentVector or None)`` one module at a time.
- ``AlignmentVector``: ``norm()``, ``apply_alignment_matrix(X)`` (``C X`` with ``C = V V^T / ||V||_F``),
  ``spectrum()`` (orthonormal basis ``U`` of the column space and singular values, so that
  ``C = U diag(sigma^2 / ||V||_F) U^T``), ``apply_orthonormal_projector(X)`` (``U U^T X``), ``dense()``.
  None of them builds a dense ``d_out x d_out`` matrix.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from guardspace_pl.distributed import full_tensor
from guardspace_pl.lora import LoraTarget, find_lora_targets

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# PEFT's saved keys: ``base_model.model.<hf_name>.lora_A.weight`` (no adapter name in saved files).
_ADAPTER_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


class AlignmentVector:
    """One module's alignment vector ``V`` (``d_out x d_in``), dense or as factors ``V = left @ right``.

    Args:
        left: the dense ``V`` (when ``right`` is None) or the left factor, ``d_out x k``.
        right: the right factor, ``k x d_in`` (None for a dense ``V``).
    """

    def __init__(self, left: Tensor, right: Optional[Tensor] = None) -> None:
        if left.ndim != 2 or (right is not None and (right.ndim != 2 or right.shape[0] != left.shape[1])):
            shapes = (tuple(left.shape), None if right is None else tuple(right.shape))
            raise ValueError(f"An alignment vector is a matrix or two matrices left @ right; got shapes {shapes}.")
        self.left = left
        self.right = right
        self._norm: Optional[float] = None
        self._spectrum: Optional[tuple[Tensor, Tensor]] = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return (self.left.shape[0], self.left.shape[1] if self.right is None else self.right.shape[1])

    @property
    def is_factored(self) -> bool:
        """True when ``V`` is kept as ``left @ right`` (a safety patch)."""
        return self.right is not None

    def dense(self) -> Tensor:
        """The full ``V`` (for tests and small models)."""
        return self.left if self.right is None else self.left @ self.right

    def norm(self) -> float:
        """``||V||_F``, computed in float64 (from ``k x k`` Gram matrices when factored)."""
        if self._norm is None:
            if self.right is None:
                self._norm = self.left.double().norm().item()
            else:
                left, right = self.left.double(), self.right.double()
                square = ((left.T @ left) * (right @ right.T)).sum().clamp_min(0)  # tr(L^T L R R^T)
                self._norm = square.sqrt().item()
        return self._norm

    def spectrum(self) -> tuple[Tensor, Tensor]:
        """``(U, sigma)``: an orthonormal basis of the column space of ``V`` (``d_out x rank``) and its singular values.

        Factored: QR of both factors, then the SVD of the small ``k x k`` core. Dense: a thin SVD of ``V`` (costly at
        7B size; only the orthonormal projector and the training-time regularisers need it). Float64; singular values
        below ``max(shape) * eps * sigma_max``, eps of the stored dtype, are dropped (numerical rank, as
        ``numpy.linalg.matrix_rank``).
        """
        if self._spectrum is None:
            if self.right is None:
                u, sigma, _ = torch.linalg.svd(self.left.double(), full_matrices=False)
            else:
                q_left, r_left = torch.linalg.qr(self.left.double())
                q_right, r_right = torch.linalg.qr(self.right.double().T)
                u_core, sigma, _ = torch.linalg.svd(r_left @ r_right.T)
                u = q_left @ u_core
            # Rounding noise of the stored dtype (float32 V from bf16 checkpoints) is not a direction of V.
            tolerance = max(self.shape) * torch.finfo(self.left.dtype).eps * (sigma[0].item() if sigma.numel() else 0.0)
            keep = int((sigma > tolerance).sum().item()) if sigma.numel() and sigma[0] > 0 else 0
            self._spectrum = (u[:, :keep].contiguous(), sigma[:keep].contiguous())
        return self._spectrum

    def apply_alignment_matrix(self, x: Tensor) -> Tensor:
        """``C x`` with SafeLoRA's ``C = V V^T / ||V||_F``, without forming ``C``.

        Args:
            x: a ``d_out x r`` matrix (e.g. ``lora_B``); the result has its dtype.
        """
        norm = self.norm()
        if norm == 0:
            return torch.zeros_like(x)
        if self.right is None:
            v = self.left.to(device=x.device, dtype=x.dtype)
            return v @ (v.T @ x) / norm
        u, sigma = self.spectrum()
        u = u.to(device=x.device, dtype=x.dtype)
        weights = (sigma.pow(2) / norm).to(device=x.device, dtype=x.dtype)
        return u @ (weights[:, None] * (u.T @ x))

    def apply_orthonormal_projector(self, x: Tensor) -> Tensor:
        """``U U^T x``: the orthogonal projection onto the column space of ``V`` (SafeLoRA's ``orthonormal`` option).

        Args:
            x: a ``d_out x r`` matrix; the result has its dtype.
        """
        u, _ = self.spectrum()
        u = u.to(device=x.device, dtype=x.dtype)
        return u @ (u.T @ x)

    def alignment_matrix_dense(self) -> Tensor:
        """The dense ``d_out x d_out`` ``C = V V^T / ||V||_F`` in float64 (tests only)."""
        v = self.dense().double()
        norm = self.norm()
        return v @ v.T / norm if norm > 0 else torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64)


class SafetyReference:
    """Alignment vectors ``V = W_aligned - W_base`` keyed by Hugging Face module name (``model.layers.0.mlp.up_proj``).

    Build it with :meth:`from_checkpoints` (base and aligned safetensors checkpoints, read lazily) or
    :meth:`from_patch_adapter` (a PEFT safety-patch adapter, kept factored), or directly from tensors.

    Args:
        vectors: module name -> ``AlignmentVector`` or dense ``V`` tensor (for references built in memory).
        loader: module name -> ``AlignmentVector``, called once per use (for references read lazily).
        shapes: module name -> ``(d_out, d_in)`` of every module ``loader`` can serve.
        complete: True when the reference covers every linear layer of its model, so a LoRA layer it lacks means a
            missing tensor (an error) rather than a module left out on purpose (a warning).
        source: a short description for messages and reports.
    """

    def __init__(
        self,
        vectors: Optional[Mapping[str, Union[AlignmentVector, Tensor]]] = None,
        loader: Optional[Callable[[str], AlignmentVector]] = None,
        shapes: Optional[Mapping[str, tuple[int, int]]] = None,
        complete: bool = False,
        source: str = "in-memory reference",
    ) -> None:
        if (vectors is None) == (loader is None):
            raise ValueError(
                "Pass either vectors= (in memory) or loader= with shapes= (read lazily), not both or neither."
            )
        if loader is not None and shapes is None:
            raise ValueError("A lazily read reference needs shapes= (module name -> (d_out, d_in)).")
        self._vectors = {
            name: v if isinstance(v, AlignmentVector) else AlignmentVector(v) for name, v in (vectors or {}).items()
        }
        self._loader = loader
        self._shapes = dict(shapes) if shapes is not None else {name: v.shape for name, v in self._vectors.items()}
        self.complete = complete
        self.source = source
        #: module name -> reason it cannot be served (a tensor present in one checkpoint only)
        self.missing: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        """The module names the reference covers."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of module ``name`` without reading it.

        Args:
            name: the module's name inside the Hugging Face model.
        """
        return tuple(self._shapes[name])

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def vector(self, name: str) -> AlignmentVector:
        """``V`` of module ``name`` (read from disk now for a checkpoint reference; not cached).

        Args:
            name: the module's name inside the Hugging Face model.
        """
        if name not in self._shapes:
            raise KeyError(f"The safety reference ({self.source}) has no module {name!r}.")
        return self._vectors[name] if self._loader is None else self._loader(name)

    def check_targets(self, targets: Sequence[LoraTarget]) -> list[LoraTarget]:
        """The targets the reference covers, after checking every one, from metadata only.

        A shape mismatch (a reference for another model) is a ``ValueError`` naming the module and both shapes; a
        target the reference lacks is an error for a complete reference (missing checkpoint tensor) and otherwise
        listed in ONE warning (those modules are left as they are).

        Args:
            targets: the LoRA layers a method acts on (``guardspace_pl.lora.find_lora_targets``).
        """
        covered, uncovered = [], []
        for target in targets:
            name = target.hf_name
            if name in self.missing:
                raise ValueError(f"The safety reference ({self.source}) cannot serve {name}: {self.missing[name]}.")
            if name not in self._shapes:
                uncovered.append(name)
                continue
            if tuple(self._shapes[name]) != tuple(target.shape):
                raise ValueError(
                    f"The safety reference ({self.source}) does not fit this model: {name} is "
                    f"{tuple(self._shapes[name])} in the reference but {tuple(target.shape)} in the model. Build the "
                    "reference from the base/aligned pair (or safety patch) of the model being fine-tuned."
                )
            covered.append(target)
        if uncovered and self.complete:
            raise ValueError(
                f"The safety reference ({self.source}) has no weight for {len(uncovered)} LoRA layer(s), e.g. "
                f"{uncovered[:3]}: the checkpoints lack these tensors. Pass checkpoints of the model being fine-tuned."
            )
        if uncovered:
            warnings.warn(
                f"The safety reference ({self.source}) does not cover {len(uncovered)} of {len(targets)} LoRA layers; "
                f"they are left unchanged: {uncovered}",
                stacklevel=2,
            )
        if not covered:
            raise ValueError(
                f"The safety reference ({self.source}) covers none of the {len(targets)} LoRA layers (e.g. "
                f"{[t.hf_name for t in targets[:3]]}; it has e.g. {self.names[:3]}): it was made for other modules."
            )
        return covered

    def for_targets(self, targets: Sequence[LoraTarget]) -> Iterator[tuple[LoraTarget, Optional[AlignmentVector]]]:
        """Check all targets now (:meth:`check_targets`), then yield ``(target, V or None)`` one module at a time.

        Uncovered targets come with None. For a checkpoint reference each ``V`` is read when its turn comes and can
        be dropped before the next: at most one module's tensors are in memory.

        Args:
            targets: the LoRA layers a method acts on.
        """
        covered = {id(t) for t in self.check_targets(targets)}

        def generate() -> Iterator[tuple[LoraTarget, Optional[AlignmentVector]]]:
            for target in targets:
                yield target, (self.vector(target.hf_name) if id(target) in covered else None)

        return generate()

    # ------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_checkpoints(
        cls,
        base_dir: Union[str, Path],
        aligned_dir: Union[str, Path],
        module_names: Optional[Sequence[str]] = None,
    ) -> "SafetyReference":
        """``V = W_aligned - W_base`` read lazily from two safetensors checkpoints (single file or sharded).

        Only the files' headers are read here; ``vector(name)`` later reads exactly two tensors (``name.weight`` of
        each checkpoint) and subtracts them in float32.

        Args:
            base_dir: the base model's directory (``model.safetensors`` or ``model.safetensors.index.json``), or a
                ``builtin:`` model name.
            aligned_dir: the aligned model's directory, same architecture.
            module_names: modules to cover (default: every 2-D ``.weight`` tensor present in both checkpoints).
        """
        base = _SafetensorsCheckpoint(base_dir)
        aligned = _SafetensorsCheckpoint(aligned_dir)
        base_shapes, aligned_shapes = base.matrix_shapes(), aligned.matrix_shapes()
        if module_names is None:
            names = [n for n in base_shapes if n in aligned_shapes]
            missing = {
                n: f"{n}.weight is in the {'base' if n in base_shapes else 'aligned'} checkpoint only"
                for n in set(base_shapes) ^ set(aligned_shapes)
            }
        else:
            names = list(module_names)
            absent = [
                f"{n}.weight ({'base' if n not in base_shapes else 'aligned'} checkpoint)"
                for n in names
                if n not in base_shapes or n not in aligned_shapes
            ]
            if absent:
                raise ValueError(
                    f"The checkpoints lack {len(absent)} requested tensor(s): {absent[:5]}. Pass module names as in "
                    "the Hugging Face model (e.g. model.layers.0.self_attn.q_proj), of the model the checkpoints hold."
                )
            missing = {}
        for name in names:
            if base_shapes[name] != aligned_shapes[name]:
                raise ValueError(
                    f"The base and aligned checkpoints differ in shape at {name}: {base_shapes[name]} in "
                    f"{base.directory} but {aligned_shapes[name]} in {aligned.directory}. They must be the same "
                    "architecture."
                )
        if not names:
            raise ValueError(f"The checkpoints {base.directory} and {aligned.directory} share no 2-D weight tensor.")

        def load(name: str) -> AlignmentVector:
            key = f"{name}.weight"
            w_aligned = read_tensor(aligned.file_of(key), key).float()
            w_base = read_tensor(base.file_of(key), key)
            return AlignmentVector(w_aligned.sub_(w_base.float()))

        reference = cls(
            loader=load, shapes={n: base_shapes[n] for n in names}, complete=module_names is None,
            source=f"checkpoints {base.directory} -> {aligned.directory}",
        )
        reference.missing = missing
        return reference

    @classmethod
    def from_patch_adapter(
        cls, adapter: Union[str, Path, nn.Module], adapter_name: Optional[str] = None
    ) -> "SafetyReference":
        """``V = s B A`` of a LoRA safety patch, kept factored (``left = s B``, ``right = A``).

        Args:
            adapter: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), or a model
                holding the patch as PEFT LoRA layers (a ``PeftModel`` or a module containing one).
            adapter_name: for a model, the adapter holding the patch (default: the single active one).
        """
        if isinstance(adapter, nn.Module):
            vectors = {}
            for target in find_lora_targets(adapter, adapter_name):
                lora_A = full_tensor(target.lora_A).detach().float()
                lora_B = full_tensor(target.lora_B).detach().float()
                vectors[target.hf_name] = AlignmentVector(target.scaling * lora_B, lora_A)
            return cls(vectors=vectors, source=f"patch adapter in {type(adapter).__name__}")
        return cls(vectors=_read_patch_adapter(Path(adapter)), source=f"patch adapter {adapter}")


def as_safety_reference(reference: Union["SafetyReference", str, Path]) -> "SafetyReference":
    """``reference`` itself, or the reference of the safety-patch adapter in that directory (what the callbacks
    accept from a config file).

    Args:
        reference: a ``SafetyReference`` or a PEFT safety-patch adapter directory.
    """
    if isinstance(reference, (str, Path)):
        return SafetyReference.from_patch_adapter(reference)
    if not isinstance(reference, SafetyReference):
        raise TypeError(
            f"reference must be a SafetyReference or a safety-patch adapter directory, got {type(reference).__name__}."
        )
    return reference


# ---------------------------------------------------------------------------------------------- files
def read_tensor(path: Union[str, Path], key: str) -> Tensor:
    """One tensor of a safetensors file (memory-mapped: nothing else of the file is read).

    Args:
        path: the ``.safetensors`` file.
        key: the tensor's name in it.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor(key)


class _SafetensorsCheckpoint:
    """The tensor -> file map and the shapes of a Hugging Face safetensors checkpoint, from headers only."""

    def __init__(self, directory: Union[str, Path]) -> None:
        directory = str(directory)
        if directory.startswith("builtin:"):
            from guardspace_pl.loading import resolve_model_source

            directory = resolve_model_source(directory)[0]
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
        index = self.directory / _INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.weight_map = {key: self.directory / file for key, file in weight_map.items()}
        elif (self.directory / _SINGLE_FILE).exists():
            from safetensors import safe_open

            with safe_open(str(self.directory / _SINGLE_FILE), framework="pt", device="cpu") as f:
                self.weight_map = {key: self.directory / _SINGLE_FILE for key in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.directory} holds no {_SINGLE_FILE} or {_INDEX_FILE}: the safety reference reads safetensors "
                "checkpoints tensor by tensor. Re-save the model with save_pretrained(..., safe_serialization=True)."
            )

    def file_of(self, key: str) -> Path:
        if key not in self.weight_map:
            raise ValueError(f"The checkpoint {self.directory} has no tensor {key}.")
        return self.weight_map[key]

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> shape of its 2-D ``.weight`` tensor."""
        from safetensors import safe_open

        shapes: dict[str, tuple[int, int]] = {}
        for file in sorted(set(self.weight_map.values())):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith(".weight"):
                        shape = tuple(f.get_slice(key).get_shape())
                        if len(shape) == 2:
                            shapes[key[: -len(".weight")]] = shape
        return shapes


def _read_patch_adapter(directory: Path) -> dict[str, AlignmentVector]:
    """Factors ``(s B, A)`` per module of a saved PEFT LoRA adapter, with PEFT's rules for rank and alpha."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise FileNotFoundError(
            f"{directory} is not a PEFT adapter directory (it needs adapter_config.json and "
            "adapter_model.safetensors). Pass the directory a safety patch was saved to (make one with `python -m "
            "guardspace_pl align --config configs/safety_patch_smollm2.yaml`, or your model's safety-patch config), "
            "or build the reference with SafetyReference.from_checkpoints."
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory} is a {config.get('peft_type')} adapter; a safety patch must be a LoRA adapter.")
    if config.get("use_dora"):
        raise ValueError(f"{directory} is a DoRA adapter: its update is not s B A. Use a plain LoRA safety patch.")
    if config.get("fan_in_fan_out"):
        raise ValueError(
            f"{directory} uses fan_in_fan_out (Conv1D layers); the safety reference supports nn.Linear layers."
        )
    weights = load_file(str(weights_path))  # an adapter is small: r (d_in + d_out) numbers per module
    factors: dict[str, dict[str, Tensor]] = {}
    ignored = []
    for key, tensor in weights.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            ignored.append(key)
            continue
        factors.setdefault(match["name"], {})[match["factor"]] = tensor
    if not factors:
        raise ValueError(f"{weights_path} holds no LoRA layers (no lora_A/lora_B weights); keys: {list(weights)[:5]}.")
    if ignored:
        warnings.warn(
            f"The safety patch {directory} also changes {len(ignored)} tensors that are not LoRA factors (e.g. "
            f"{ignored[:3]}); the safety reference holds only the LoRA layers' updates.",
            stacklevel=3,
        )
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    vectors = {}
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{weights_path}: module {name} has lora_{next(iter(pair))} but not its other factor.")
        lora_A, lora_B = pair["A"].float(), pair["B"].float()
        rank = lora_A.shape[0]
        expected_rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
        if rank != expected_rank or lora_B.shape[1] != rank:
            raise ValueError(
                f"{directory}: {name} has factors of shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} but the "
                f"config says rank {expected_rank}: the adapter files are inconsistent."
            )
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
        scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        vectors[name] = AlignmentVector(scaling * lora_B, lora_A)
    return vectors
