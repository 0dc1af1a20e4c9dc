"""megapuzzle: Puzzle (arXiv 2411.19146) distillation-based NAS on Megatron-core."""

__version__ = "0.1.0"
