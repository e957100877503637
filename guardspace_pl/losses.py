"""The response-only causal-LM loss, without vocabulary projections of the prompt positions."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


def response_loss(
    lm: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Optional[Tensor] = None,
    label_weights: Optional[Tensor] = None,
) -> Tensor:
    """Mean cross-entropy of the labelled tokens (``labels != -100``; token ``t`` predicts ``t + 1``): the loss
    Hugging Face computes for ``labels=``, with logits computed only from the last position before the first
    labelled token (``logits_to_keep``). With ``label_weights``, the weighted mean ``sum(w * ce) / sum(w)``.

    A safety sample is mostly prompt, and at 50-130k-token vocabularies the prompt positions' vocabulary
    projection (and their float32 logits) is a large share of a short sequence's forward and backward. A model
    whose ``forward`` takes no ``logits_to_keep`` gets Hugging Face's full loss instead.

    Args:
        lm: a Hugging Face causal LM or a PEFT model wrapping one.
        input_ids: ``[batch, length]`` token ids.
        labels: ``[batch, length]``, the ids to predict and ``-100`` elsewhere.
        attention_mask: ``[batch, length]`` or None.
        label_weights: ``[batch, length]``, each labelled token's weight in the mean (e.g. more on the first answer
            tokens, where a safety patch decides between refusing and answering), or None for equal weights.
    """
    labelled = (labels != -100).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    start = max(int(labelled[0]) - 1, 0)  # the position that predicts the first labelled token
    try:
        logits = lm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=labels.shape[1] - start).logits
    except TypeError as error:
        if "logits_to_keep" not in str(error):
            raise
        if label_weights is None:
            return lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        start, logits = 0, lm(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = labels[:, start + 1 :]
    if label_weights is None:
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    token_losses = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
    )
    weights = label_weights[:, start + 1 :].flatten().to(token_losses.dtype) * (targets.flatten() != -100)
    return (token_losses * weights).sum() / weights.sum()
