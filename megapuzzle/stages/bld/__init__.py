"""Stage `bld`: child initialisation + blockwise local distillation into the block library."""
