"""Instructions -> token ids: the one tokenisation the training windows and the policy runtime share."""

from __future__ import annotations

from typing import Any

import torch


def tokenize(processor: Any, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Instructions -> (ids (B, L) long, mask (B, L) long), L = max_len, "<s> ... </s>" right-padded.

    The tokenizer alone (a Kosmos-2 processor's ``__call__`` would insert its ``<image>`` placeholder
    layout, which the backbone builds itself from embeddings); ``processor`` is the processor or its
    tokenizer. Truncation keeps <s> and </s>.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_len,
        padding_side="right",  # the backbone appends the action token after the last real token
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()
