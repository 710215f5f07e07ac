"""Task evaluation: GLUE (glue.py) and SQuAD (squad.py) data loading, official metrics, fine-tuning."""

from compress.evaluate import glue, squad

__all__ = ["glue", "squad"]
