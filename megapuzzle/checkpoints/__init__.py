"""Checkpoints: our canonical format, HF Llama import, HF DeciLM export, the block library."""
