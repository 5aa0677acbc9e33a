"""MIRROR model package (no Qt, no napari)."""
__version__ = "0.1.0"
