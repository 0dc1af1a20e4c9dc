"""Stage `score`: replace-1-block scoring of every library block."""
