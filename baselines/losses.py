"""ReActNet's distributional loss: soft cross-entropy of the binary student against a real-valued teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distribution_loss"]


def distribution_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of -sum_c softmax(teacher)_c * log_softmax(student)_c (ReActNet utils/KD_loss.py).

    Same gradient as KL(teacher || student); the teacher is not differentiated.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    target = F.softmax(teacher_logits.detach(), dim=1)
    return -(target * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
