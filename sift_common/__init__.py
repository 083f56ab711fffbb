"""What every part of SIFT-Train shares and nothing else: the error root, atomic writes, logging set-up
and run provenance. Imports nothing from the other packages (the data pipeline sits on top of it)."""
