"""Task evaluation: GLUE (glue.py) and SQuAD (squad.py) data loading, official metrics, fine-tuning; ROUGE/BLEU of generated text (generation.py)."""

from compress.evaluate import generation, glue, squad

__all__ = ["generation", "glue", "squad"]
