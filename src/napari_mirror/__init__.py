"""napari plugin for MIRROR."""
__version__ = "0.1.0"
