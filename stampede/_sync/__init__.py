"""Generated sync twins of stampede/_async (see scripts/make_sync.py)."""
