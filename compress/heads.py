"""The task stage after a general distillation: the general student takes the fine-tuned teacher's task heads.

A general (task-agnostic) distillation, the first stage of the TinyBERT/MiniLM schedule,
compresses the *pretrained* model and distills it on unlabelled text; it has no task heads.
The task stage then distills it from the *fine-tuned* teacher with the task's data, which
needs the student to have the teacher's heads: `adopt_heads` gives them, starting from the
teacher's own head weights wherever the shapes agree (they do unless the width was pruned).
"""

from __future__ import annotations

import torch

from model.rebuild import rebuild
from model.transformer import Transformer

_HEAD_PREFIXES = ("heads.", "pooler.")


def adopt_heads(student: Transformer, teacher: Transformer, *, seed: int = 0) -> Transformer:
    """A copy of `student` whose heads (and pooler) are the teacher's: its weights where shapes fit, else fresh.

    Args:
        student: the general student (not modified); its encoder, embeddings and decoder are kept.
        teacher: the fine-tuned teacher whose heads the task stage distills.
        seed: seeds the initialisation of any head weight the teacher's cannot fill.

    Returns:
        The student with `teacher.config.heads` and `n_labels`; its other heads are dropped.
    """
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, Transformer):
            raise TypeError(f"{name} must be a model.Transformer, got {type(model).__name__}")
    if student.config.quantized:
        raise ValueError("the student is quantized: adopt the teacher's heads before the Quantize pass")
    if not teacher.config.heads:
        raise ValueError("the teacher has no task heads to adopt")
    if student.config.heads == teacher.config.heads and student.config.n_labels == teacher.config.n_labels:
        return student
    config = student.config.replace(heads=teacher.config.heads, n_labels=teacher.config.n_labels)
    with torch.device("meta"):
        wanted = Transformer(config, attention_backend=student.attention_backend).state_dict()
    state = {k: v for k, v in student.state_dict().items() if k in wanted and not k.startswith(_HEAD_PREFIXES)}
    for key, value in teacher.state_dict().items():
        if key.startswith(_HEAD_PREFIXES) and key in wanted and wanted[key].shape == value.shape:
            state[key] = value
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        return rebuild(student, config, state, optional=_HEAD_PREFIXES)
