"""Invoke namespace: thin tasks that parse flags and call the engine; `tasks.py` exposes it."""
