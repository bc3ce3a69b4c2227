"""Helpers shared by several test folders (importable as `support.<module>`: tests/ is on sys.path)."""
