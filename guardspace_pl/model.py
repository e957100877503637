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
from torchmetrics.aggregation import SumMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup
from typing_extensions import override

from guardspace_pl.distributed import broadcast_object, full_tensor, is_distributed, rank, world_size
from guardspace_pl.evaluation.accuracy import gsm8k_exact_match
from guardspace_pl.evaluation.generation import answer_token_losses, generate_from_texts, prepare_sharded_generation
from guardspace_pl.evaluation.judges import BeaverDamJudge, Judge, KeywordRefusalJudge
from guardspace_pl.evaluation.results import Result, format_table, write_results
from guardspace_pl.loading import empty_causal_lm, load_causal_lm, load_tokenizer
from guardspace_pl.losses import response_loss
from guardspace_pl.prompts import format_prompt

log = logging.getLogger(__name__)

#: Harmful-score judges ``test`` can use; the name is recorded with every number it produces.
JUDGES = ("keyword", "beaver-dam")
#: Running sums of ``test``, synced across ranks at epoch end: (hits, weighted count) per metric.
TEST_SUMS = ("harmful_flagged", "harmful_n", "refused", "safe_n", "correct", "task_n", "token_loss", "tokens")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (the classes it lists in ``_no_split_modules``)."""
    hf_model = model.get_base_model() if isinstance(model, PeftModel) else model
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    blocks = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not blocks:
        lists = [
            m
            for name, m in hf_model.named_modules()
            if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
        ]
        blocks = [block for module_list in lists for block in module_list]
    if not blocks:
        raise ValueError(
            f"Cannot find the decoder blocks of {type(hf_model).__name__}; pass target_modules explicitly."
        )
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
    """Default: every linear of every decoder block. A name that matches nothing is an error that lists the real
    ones."""
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
        lora_rank: the LoRA adapter's rank ``r`` (PEFT).
        lora_alpha: the LoRA ``alpha``; the adapter's scaling is ``alpha / rank``.
        lora_dropout: dropout on the LoRA branch's input.
        target_modules: leaf module names; default every linear of every decoder block (never lm_head).
        learning_rate: AdamW's peak learning rate (linear warmup, then cosine decay).
        weight_decay: AdamW's decoupled weight decay.
        warmup_ratio: the share of the training steps spent in linear warmup.
        betas: AdamW's ``(beta1, beta2)``.
        activation_checkpointing: recompute block activations in backward to save memory.
        load_on_rank_zero: under FSDP2 on several processes, only global rank 0 reads the checkpoint; the other
            ranks build the model on the meta device and receive just their shards. Peak host memory is then
            one copy of the model per job instead of one per GPU (a 7B model in bf16: 13.5 GB, not 8 x 13.5).
        adapter_dir: where the PEFT adapter is saved at the end of fit (default ``<log_dir>/adapter``).
        trust_remote_code: let transformers run the model repository's own modelling code (only for repositories
            you trust).
        eval_max_new_tokens: greedy tokens generated per prompt in ``test`` (the paper: 512).
        judge: harmful-score judge in ``test``: ``keyword`` (refusal phrases, default) or ``beaver-dam``
            (``PKU-Alignment/beaver-dam-7b``, or ``judge_model``). Over-refusal always uses the keyword judge.
        judge_model: hub id or local directory of the beaver-dam classifier (default the hub's).
        results_path: the ``test`` results JSON (default ``<log_dir>/results.json``).
        safety_patches: safety-patch adapter folders (``align``'s ``<output_dir>/patch``) merged into the base
            weights, in order, before the LoRA is attached: fine-tune from an aligned start, or re-apply a patch
            (``guardspace_pl.patches.apply_patches``).
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
        load_on_rank_zero: bool = True,
        adapter_dir: Optional[str] = None,
        trust_remote_code: bool = False,
        eval_max_new_tokens: int = 256,
        judge: str = "keyword",
        judge_model: Optional[str] = None,
        results_path: Optional[str] = None,
        safety_patches: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {lora_rank}.")
        if judge not in JUDGES:
            raise ValueError(f"Unknown judge {judge!r}; use one of {list(JUDGES)}.")
        if eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens must be positive, got {eval_max_new_tokens}.")
        if isinstance(safety_patches, str):
            raise TypeError(f"safety_patches must be a list of folders; wrap the one path: [{safety_patches!r}].")
        for patch in safety_patches or []:
            if not os.path.isdir(patch):
                raise FileNotFoundError(
                    f"Safety patch folder {patch} does not exist: train one with `python -m guardspace_pl align`."
                )
        self.save_hyperparameters()
        self.model: Optional[PeftModel] = None
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.saved_adapter_dir: Optional[str] = None
        self._judge: Optional[Judge] = None
        self._test_metrics: dict[str, SumMetric] = {}
        #: The rows of the last ``test`` run (also written to ``results_path``).
        self.test_results: list[Result] = []

    @classmethod
    def from_pretrained_model(
        cls, model: PreTrainedModel, tokenizer: Optional[PreTrainedTokenizerBase] = None, **kwargs: Any
    ) -> "GuardSpaceLM":
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
        if hp.safety_patches and not any(p.is_meta for p in base.parameters()):
            # Meta ranks of a rank-zero load receive the patched weights from rank 0.
            from guardspace_pl.patches import apply_patches

            base = apply_patches(base, hp.safety_patches, mode="merged")
        targets = resolve_target_modules(base, hp.target_modules)
        config = LoraConfig(
            r=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        if hp.activation_checkpointing:
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = get_peft_model(base, config)
        # from_pretrained returns the model in eval mode; Lightning keeps each module's mode, so without this the
        # base would train in eval mode (its dropout off) and Lightning warns about it. Trainer.validate/test switch
        # to eval themselves.
        self.model.train()

    @override
    def configure_model(self) -> None:
        # Lightning may call this more than once (e.g. validate after fit): build only once.
        if self.model is None and self.device_mesh is not None and self.hparams.load_on_rank_zero and world_size() > 1:
            self._load_on_rank_zero_and_shard(self.device_mesh)
            return
        if self.model is None:
            self._attach_lora(load_causal_lm(*self._load_args()))
        if self.device_mesh is not None:
            self._shard(self.device_mesh)

    def _load_args(self) -> tuple:
        hp = self.hparams
        return hp.model_name_or_path, hp.gguf_file, hp.dtype, hp.attn_implementation, hp.trust_remote_code

    def _load_on_rank_zero_and_shard(self, device_mesh) -> None:
        """Rank 0 loads the checkpoint and initialises LoRA; the others build both on the meta device. After
        sharding, torch.distributed.checkpoint broadcasts rank 0's tensors one at a time and every rank keeps
        only its shard, so the result equals loading everywhere (same LoRA init as one process)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        rank_zero = rank() == 0
        self._attach_lora(load_causal_lm(*self._load_args()) if rank_zero else empty_causal_lm(*self._load_args()))
        full_state = self.model.state_dict() if rank_zero else {}
        self._shard(device_mesh)
        set_model_state_dict(
            self.model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        del full_state
        # Rank 0's LoRA init drew random numbers that the meta ranks did not: realign every rank's generator.
        torch.set_rng_state(broadcast_object(torch.get_rng_state()))

    def _shard(self, device_mesh) -> None:
        """FSDP2: one ``fully_shard`` unit per decoder block, then the root (embeddings, norm, head)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        if (
            device_mesh.mesh_dim_names
            and "tensor_parallel" in device_mesh.mesh_dim_names
            and device_mesh["tensor_parallel"].size() > 1
        ):
            raise ValueError("GuardSpaceLM supports data parallelism (FSDP2) only: set tensor_parallel_size=1.")
        mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
        for block in decoder_blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    @override
    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The mean cross-entropy of the batch's labelled (response) tokens, with logits computed only from the last
        prompt position on (:func:`guardspace_pl.losses.response_loss`): the prompt positions' vocabulary
        projection and float32 logits are skipped, which at 50-130k-token vocabularies is memory as well as time.

        Args:
            batch: ``input_ids``, ``labels`` (``-100`` off the response), optionally ``attention_mask`` and
                ``label_weights`` (each labelled token's weight in the mean; e.g. ``SafetyPatchDataModule``'s
                ``decision_weight``).
        """
        return response_loss(
            self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), batch.get("label_weights")
        )

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
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
        target = self.hparams.adapter_dir or os.path.join(
            self.trainer.log_dir or self.trainer.default_root_dir, "adapter"
        )
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
        use_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        texts = [format_prompt(self.tokenizer, p, "chat_template" if use_template else "raw") for p in prompts]
        return self.generate_from_texts(texts, add_special_tokens=not use_template, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ generation-based evaluation (``test``)

    @torch.no_grad()
    def generate_from_texts(self, texts: list[str], add_special_tokens: bool, max_new_tokens: int) -> list[str]:
        """Greedy completions of already formatted prompt texts, batched with left padding.

        Under several ranks, generation runs in lock-step (``synced_gpus``): a rank whose rows all finished keeps
        stepping until every rank is done, so sharded models (FSDP2) never wait at an all-gather alone.
        """
        return generate_from_texts(
            self.model, self.tokenizer, texts, add_special_tokens, max_new_tokens,
            synced_gpus=is_distributed() and world_size() > 1,
        )

    def _load_judge(self) -> Judge:
        if self.hparams.judge == "beaver-dam":
            kwargs = {"model_name_or_path": self.hparams.judge_model} if self.hparams.judge_model else {}
            return BeaverDamJudge(device=self.device, **kwargs)
        return KeywordRefusalJudge()

    @override
    def on_test_start(self) -> None:
        # generate() bypasses the root module's forward, whose hook gathers the root's own parameters
        # (embeddings, norm, head) under FSDP2: registered as a forward method so it does the same.
        prepare_sharded_generation(self.model)
        if self._judge is None:
            self._judge = self._load_judge()
        # Plain sums, synced across ranks by compute(); kept out of the module tree so checkpoints are unchanged.
        self._test_metrics = {name: SumMetric(nan_strategy="disable").to(self.device) for name in TEST_SUMS}
        for metric in self._test_metrics.values():
            # Every rank must take part in every sync at epoch end, whichever kinds of batch it saw.
            metric.update(torch.zeros((), device=self.device))

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Generate for one batch of evaluation prompts and add its judged outcomes to the running sums."""
        kind = batch["kind"]
        responses = self.generate_from_texts(
            batch["texts"], batch["add_special_tokens"], self.hparams.eval_max_new_tokens
        )
        weights = batch["weights"].to(self.device, torch.float32)
        if kind == "harmful":
            flags = self._judge.harmful_flags(batch["prompts"], responses)
            hits, count = "harmful_flagged", "harmful_n"
        elif kind == "safe":
            flags = KeywordRefusalJudge().refusal_flags(responses)
            hits, count = "refused", "safe_n"
        elif kind == "task":
            flags = [gsm8k_exact_match(r, ref) for r, ref in zip(responses, batch["references"])]
            hits, count = "correct", "task_n"
            token_loss, tokens = self._answer_loss(batch, weights)
            self._test_metrics["token_loss"].update(token_loss)
            self._test_metrics["tokens"].update(tokens)
        else:
            raise ValueError(f"Unknown evaluation batch kind {kind!r}; expected 'harmful', 'safe' or 'task'.")
        flags_t = torch.tensor([float(f) for f in flags], device=self.device)
        self._test_metrics[hits].update((flags_t * weights).sum())
        self._test_metrics[count].update(weights.sum())

    def _answer_loss(self, batch: dict[str, Any], weights: Tensor) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy of the reference answers (labels) and their token count, padding rows weighted 0."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, keep = answer_token_losses(logits, batch["labels"])
        row_weights = weights[:, None]
        return (losses * row_weights).sum(), (keep * row_weights).sum()

    @override
    def on_test_epoch_end(self) -> None:
        sums = {name: float(metric.compute()) for name, metric in self._test_metrics.items()}
        rows: list[Result] = []
        if sums["harmful_n"] > 0:
            harmful_score = 100.0 * sums["harmful_flagged"] / sums["harmful_n"]
            rows.append(Result("harmful_score", harmful_score, self._judge.name, sums["harmful_n"]))
        if sums["safe_n"] > 0:
            over_refusal = 100.0 * sums["refused"] / sums["safe_n"]
            rows.append(Result("over_refusal", over_refusal, KeywordRefusalJudge.name, sums["safe_n"]))
        if sums["task_n"] > 0:
            rows.append(Result("gsm8k_accuracy", 100.0 * sums["correct"] / sums["task_n"], None, sums["task_n"]))
            rows.append(Result("gsm8k_loss", sums["token_loss"] / max(sums["tokens"], 1.0), None, sums["task_n"]))
        self.test_results = rows
        for row in rows:
            # Every rank already holds the global value (compute() synced the sums); averaging equal values
            # across ranks changes nothing and keeps Lightning's epoch-level logging consistent.
            self.log(row.metric if row.judge is None else f"{row.metric}/{row.judge}", row.value, sync_dist=True)
        if self.trainer.is_global_zero:
            path = self.hparams.results_path or os.path.join(
                self.trainer.log_dir or self.trainer.default_root_dir, "results.json"
            )
            write_results(rows, path)
            print(f"\n{format_table(rows)}\n\nResults written to {path}")
        for metric in self._test_metrics.values():
            metric.reset()
