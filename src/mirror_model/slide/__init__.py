"""Whole-slide access, tissue detection and tile grids.

>>> from mirror_model.slide import open_slide, make_tile_grid
>>> with open_slide("slide.svs") as slide:          # doctest: +SKIP
...     grid = make_tile_grid(slide, target_mpp=0.5, tile_px=256)
"""

from ._access import SlideHandle, open_slide
from ._tiling import TileGrid, make_tile_grid
from ._tissue import TissueMask, detect_tissue, otsu_threshold, saturation

__all__ = [
    "SlideHandle",
    "TileGrid",
    "TissueMask",
    "detect_tissue",
    "make_tile_grid",
    "open_slide",
    "otsu_threshold",
    "saturation",
]
