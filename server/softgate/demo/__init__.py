"""``softgate demo``: an end-to-end RL example whose every loss and gradient comes from softgate."""

from softgate.demo.cli import main

__all__ = ["main"]
