"""Stage `parent`: train the embedded parent (or import one)."""
