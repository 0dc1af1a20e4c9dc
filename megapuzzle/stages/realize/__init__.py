"""Stage `realize`: stitch a solution's blocks into a child checkpoint."""
