"""LLaMA-Adapter (Zhang et al. 2023, arXiv 2303.16199): a frozen LLaMA with zero-initialised, gated
adaption prompts in its top layers."""

__version__ = "0.1.0"
