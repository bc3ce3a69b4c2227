"""Substrate drivers: function, container (crun/runc/docker), microvm and vm, each registered in its `plugin.py`
(registry.py: the list the server, models, CLI and orphan sweep read)."""
