"""Text in: the built-in corpus and user corpora, and the WordPiece tokenizer."""
