"""The function substrate: Python callables run by warm pre-forked workers inside a container sandbox."""
