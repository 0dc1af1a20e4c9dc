"""Stage `mip`: pick one variant per layer (or run) under the budgets."""
