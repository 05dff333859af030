"""A tenant-isolating storage gateway for an orchestrator's internal storage."""

__version__ = "0.1.0"
