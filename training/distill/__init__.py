"""DSG-KD distillation across tokenizers: align both models on shared words, then compare them word by word.

`align` labels every student and teacher token with the word it covers (done in the data
collator); `losses` pools both models onto those words and computes the hidden-state and
attention losses added to the student's cross-entropy. Their options are `training.config.DistillArguments`.
"""

from training.distill.align import Script, Word, WordAlignment, WordPolicy, align_words, split_words
from training.distill.losses import (
    DistillLossOutput,
    MultiLevelDistillLoss,
    TeacherWordFeatures,
    logit_distill_loss,
    pool_words,
    uniform_layer_map,
    word_attention,
)

__all__ = [
    "DistillLossOutput",
    "MultiLevelDistillLoss",
    "Script",
    "TeacherWordFeatures",
    "Word",
    "WordAlignment",
    "WordPolicy",
    "align_words",
    "logit_distill_loss",
    "pool_words",
    "split_words",
    "uniform_layer_map",
    "word_attention",
]
