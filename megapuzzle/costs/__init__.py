"""Variant costs shared by the stages: the cost table (costs.json) and timing harness."""
