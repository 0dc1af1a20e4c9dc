"""Process-level runtime: torch.distributed + Megatron parallel_state, seeds, CPU bridges."""

import warnings

# Megatron-core warns at import time, once per module, that TE / Apex are absent; on CPU that is
# the expected configuration, not news (the fallbacks it announces are the ones we use).
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed",
                        category=UserWarning)

from .cpu_compat import apply_cpu_compat, cpu_compat_applied
from .distributed import (
    DistributedError,
    ParallelInfo,
    destroy_distributed,
    free_port,
    init_distributed,
    parallel_info,
    set_seeds,
)

__all__ = [
    "apply_cpu_compat", "cpu_compat_applied", "DistributedError", "ParallelInfo", "destroy_distributed",
    "free_port", "init_distributed", "parallel_info", "set_seeds",
]
