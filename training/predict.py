"""Probabilities of emergency from a PyTorch student, in length-sorted batches."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.collate import length_sorted_batches


@torch.inference_mode()
def predict_proba(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 384,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (P(emergency) per note, logits per note) in the order of `texts`."""
    model.eval()
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for positions in length_sorted_batches(texts, batch_size):
        batch = tokenizer(
            [texts[i] for i in positions], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        logits[positions] = model(**batch).logits.float().cpu().numpy()
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)[:, 1].numpy()
    return probs, logits
