"""Stage `evaluate`: parent vs child quality and measured speed."""
