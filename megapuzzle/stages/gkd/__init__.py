"""Stage `gkd`: global knowledge distillation of the child from the parent."""
