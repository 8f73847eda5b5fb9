"""rlrec: turn interaction logs into a generative recommender by post-training a language model."""

__version__ = "0.1.0"
