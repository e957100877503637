"""``GuardSpaceLM``: a LightningModule over a Hugging Face causal LM with PEFT LoRA adapters."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup
from typing_extensions import override

from guardspace_pl.distributed import full_tensor, rank
from guardspace_pl.loading import load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (the classes it lists in ``_no_split_modules``)."""
    hf_model = model.get_base_model() if isinstance(model, PeftModel) else model
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    blocks = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not blocks:
        lists = [m for name, m in hf_model.named_modules() if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
        blocks = [block for module_list in lists for block in module_list]
    if not blocks:
        raise ValueError(f"Cannot find the decoder blocks of {type(hf_model).__name__}; pass target_modules explicitly.")
    return blocks


def block_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every ``nn.Linear`` inside a decoder block (q_proj, ..., down_proj), in order."""
    names: list[str] = []
    for block in decoder_blocks(model):
        for name, module in block.named_modules():
            leaf = name.split(".")[-1]
            if isinstance(module, nn.Linear) and leaf not in names:
                names.append(leaf)
    return names


def resolve_target_modules(model: PreTrainedModel, target_modules: Optional[list[str]]) -> list[str]:
    """Default: every linear of every decoder block. A name that matches nothing is an error that lists the real ones."""
    available = block_linear_names(model)
    if target_modules is None or target_modules == ["all-linear"]:
        return available
    all_linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    for target in target_modules:
        if not any(name == target or name.endswith("." + target) for name, _ in model.named_modules()):
            raise ValueError(
                f"LoRA target module {target!r} matches no module of {type(model).__name__}. "
                f"Its decoder-block linear layers are {available}; all its linear layers are {all_linear}."
            )
    return list(target_modules)


class GuardSpaceLM(LightningModule):
    """Fine-tunes a causal LM with LoRA; pair it with the GuardSpace callbacks to keep its safety.

    Args:
        model_name_or_path: hub id, local directory, or ``builtin:smollm2-135m-instruct`` (no network).
        gguf_file: file name inside ``model_name_or_path`` when loading a GGUF checkpoint.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` for the model weights.
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
        lora_rank, lora_alpha, lora_dropout: the LoRA adapter (PEFT); scaling is ``alpha / rank``.
        target_modules: leaf module names; default every linear of every decoder block (never lm_head).
        learning_rate, weight_decay, warmup_ratio, betas: AdamW with linear warmup then cosine decay.
        activation_checkpointing: recompute block activations in backward to save memory.
        adapter_dir: where the PEFT adapter is saved at the end of fit (default ``<log_dir>/adapter``).
    """

    def __init__(
        self,
        model_name_or_path: str,
        gguf_file: Optional[str] = None,
        dtype: str = "float32",
        attn_implementation: Optional[str] = None,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        target_modules: Optional[list[str]] = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.999),
        activation_checkpointing: bool = False,
        adapter_dir: Optional[str] = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {lora_rank}.")
        self.save_hyperparameters()
        self.model: Optional[PeftModel] = None
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.saved_adapter_dir: Optional[str] = None

    @classmethod
    def from_pretrained_model(cls, model: PreTrainedModel, tokenizer: Optional[PreTrainedTokenizerBase] = None, **kwargs: Any) -> "GuardSpaceLM":
        """Wrap an already-built model (tests, notebooks): same LoRA set-up, no loading."""
        module = cls(model_name_or_path=getattr(model.config, "_name_or_path", "") or type(model).__name__, **kwargs)
        module._attach_lora(model)
        module._tokenizer = tokenizer
        return module

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name_or_path, self.hparams.gguf_file)
        return self._tokenizer

    def _attach_lora(self, base: PreTrainedModel) -> None:
        hp = self.hparams
        targets = resolve_target_modules(base, hp.target_modules)
        config = LoraConfig(
            r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, target_modules=targets, task_type="CAUSAL_LM"
        )
        if hp.activation_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = get_peft_model(base, config)

    @override
    def configure_model(self) -> None:
        # Lightning may call this more than once (e.g. validate after fit): build only once.
        if self.model is None:
            hp = self.hparams
            base = load_causal_lm(hp.model_name_or_path, hp.gguf_file, hp.dtype, hp.attn_implementation, hp.trust_remote_code)
            self._attach_lora(base)
        if self.device_mesh is not None:
            self._shard(self.device_mesh)

    def _shard(self, device_mesh) -> None:
        """FSDP2: one ``fully_shard`` unit per decoder block, then the root (embeddings, norm, head)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        if device_mesh.mesh_dim_names and "tensor_parallel" in device_mesh.mesh_dim_names and device_mesh["tensor_parallel"].size() > 1:
            raise ValueError("GuardSpaceLM supports data parallelism (FSDP2) only: set tensor_parallel_size=1.")
        mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
        for block in decoder_blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    @override
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(hp.warmup_ratio * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_fit_end(self) -> None:
        target = self.hparams.adapter_dir or os.path.join(self.trainer.log_dir or self.trainer.default_root_dir, "adapter")
        self.save_adapter(target)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Full (unsharded) LoRA tensors on CPU; a collective under FSDP2, so call it on every rank."""
        return {name: full_tensor(p.detach()).cpu() for name, p in self.model.named_parameters() if "lora_" in name}

    def save_adapter(self, directory: str) -> Path:
        """Save the LoRA adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        state = self.adapter_state_dict()
        if rank() == 0:
            self.model.save_pretrained(directory, state_dict=state)
            log.info("Saved the LoRA adapter to %s", directory)
        self.saved_adapter_dir = directory
        return Path(directory)

    @torch.no_grad()
    def generate_text(self, prompts: list[str], max_new_tokens: int = 48, chat_template: bool = True) -> list[str]:
        """Greedy completions (the chat template applied when the tokenizer has one)."""
        from guardspace_pl.prompts import format_prompt

        tokenizer = self.tokenizer
        use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        texts = [format_prompt(tokenizer, p, "chat_template" if use_template else "raw") for p in prompts]
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not use_template).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        finally:
            self.model.train(was_training)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
