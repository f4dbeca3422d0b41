"""Generated package (see server/gen/__init__.py)."""
