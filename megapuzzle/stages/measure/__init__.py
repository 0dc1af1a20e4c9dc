"""Stage `measure`: per-variant runtime and memory costs."""
