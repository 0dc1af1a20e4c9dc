#!/usr/bin/env python3
"""Convert a megapuzzle checkpoint to a HuggingFace DeciLM (nemotron-nas) directory.

    python tools/convert_to_hf.py --checkpoint runs/demo/child --out runs/demo/export [--dtype bf16] [--force]

Same as `megapuzzle export-hf`; kept as a script for users of Megatron-LM's tools/ layout.
"""

import sys

from megapuzzle.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-hf", *sys.argv[1:]]))
