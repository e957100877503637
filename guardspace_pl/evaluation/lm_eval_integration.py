"""lm-evaluation-harness on an in-memory model, with an offline GSM8K task read from a local JSONL file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from guardspace_pl.evaluation.generation import unwrap_model

#: The packaged task template; its data file is a placeholder filled in by ``gsm8k_local_task_dir``.
GSM8K_LOCAL_TEMPLATE = Path(__file__).resolve().parent / "tasks" / "gsm8k_local.yaml"
GSM8K_LOCAL_TASK = "gsm8k_local"


def gsm8k_local_task_dir(
    data_file: Union[str, Path],
    workdir: Union[str, Path],
    max_gen_toks: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
) -> str:
    """Write ``gsm8k_local.yaml`` pointing at ``data_file`` (absolute) into ``workdir``; returns lm-eval's include path.

    ``max_gen_toks`` overrides the template's 256 generated tokens; ``cache_dir`` sets where ``datasets``
    caches the parsed JSONL (default: its usual cache).
    """
    data_file = Path(data_file).expanduser().resolve()
    if not data_file.is_file():
        raise FileNotFoundError(
            f"GSM8K data file {data_file} does not exist; pass the JSONL with 'question'/'answer' fields "
            "(e.g. shared/data/gsm8k/test.jsonl)."
        )
    config = yaml.safe_load(GSM8K_LOCAL_TEMPLATE.read_text())
    # lm-eval resolves a relative path against the working directory, not the YAML, hence absolute.
    config["dataset_kwargs"]["data_files"] = {"test": str(data_file)}
    if cache_dir is not None:
        config["dataset_kwargs"]["cache_dir"] = str(Path(cache_dir).resolve())
    if max_gen_toks is not None:
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be positive, got {max_gen_toks}.")
        config["generation_kwargs"]["max_gen_toks"] = max_gen_toks
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / GSM8K_LOCAL_TEMPLATE.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return str(workdir.resolve())


def run_lm_eval(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    limit: Optional[Union[int, float]] = None,
    batch_size: int = 1,
    include_path: Optional[Union[str, Sequence[str]]] = None,
    num_fewshot: Optional[int] = None,
    include_defaults: bool = True,
    log_samples: bool = False,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the given model object; returns lm-eval's results dict.

    Scores live under ``result["results"][task]``, e.g. ``"exact_match,strict-match"``. ``include_path`` adds
    task YAML folders (e.g. from ``gsm8k_local_task_dir``); ``include_defaults=False`` skips indexing lm-eval's
    thousands of built-in tasks (about 14 s on CPU) when only local tasks are used. Per-sample logs are off
    unless ``log_samples=True``; other keyword arguments go to ``simple_evaluate`` (e.g. ``gen_kwargs``).
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, not one string; use tasks=[{tasks!r}].")
    if len(tasks) == 0:
        raise ValueError("tasks is empty; name at least one lm-eval task, e.g. ['gsm8k_local'].")
    # Imported here: lm-eval takes seconds to import and only this function needs it.
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token first.")
    model = unwrap_model(model)  # a GuardSpaceLM: evaluate the PEFT model inside it
    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    # Fail before building HFLM; names may be globs (lm-eval expands them) or paths to YAML files.
    unknown = [t for t in tasks if not task_manager.match_tasks([t]) and not Path(t).is_file()]
    if unknown:
        raise ValueError(
            f"lm-eval does not know the task(s) {unknown}; check the names, or pass include_path= a folder with "
            "their YAML (gsm8k_local_task_dir() writes one for GSM8K from a local file)."
        )
    was_training = model.training
    try:
        # HFLM puts the model into eval mode and uses it as it is (device and dtype included).
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=log_samples,
            **simple_evaluate_kwargs,
        )
    finally:
        model.train(was_training)
    if results is None:
        # simple_evaluate returns None on non-zero ranks of a distributed run.
        raise RuntimeError("lm_eval.simple_evaluate returned no results; call run_lm_eval on rank 0 only.")
    return results
