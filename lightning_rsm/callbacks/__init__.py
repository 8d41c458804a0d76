"""Lightning callbacks."""

from lightning_rsm.callbacks.rsm_monitor import RSMMonitor

__all__ = ["RSMMonitor"]
