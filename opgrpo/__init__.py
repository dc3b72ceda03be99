"""opgrpo: off-policy GRPO (OP-GRPO) post-training of diffusers flow-matching models on Ray."""

__version__ = "0.1.0"
