"""Substrate drivers: function, container (crun/runc/docker), microvm and vm."""
