"""Runnable examples of stampede in real programs (not part of the installed package)."""
