"""npe2 sample data: one demo patient of the synthetic cohort (slide + expression table).

The case is generated on first use into a cache folder and reused afterwards; it takes seconds.
The slide layer's ``metadata["mirror"]`` records the expression table and the patient's sample id
so the MIRROR widget picks both up when the layer is selected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["CACHE_ENV", "demo_case", "load_demo_sample", "sample_cache_dir"]

#: Environment variable overriding the cache folder (tests, shared installations).
CACHE_ENV = "NAPARI_MIRROR_CACHE"
_CASE_FOLDER = "demo-case-v1"


def sample_cache_dir() -> Path:
    """Cache folder for generated sample data.

    ``$NAPARI_MIRROR_CACHE`` if set, else the platform's user cache folder
    (``~/.cache/napari-mirror`` on Linux).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("napari-mirror", appauthor=False))
    except ImportError:  # platformdirs comes with napari; keep a sane fallback anyway
        return Path.home() / ".cache" / "napari-mirror"


def demo_case(cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The demo :class:`mirror_model.demo.SampleCase`, generated once into ``cache_dir``.

    :func:`mirror_model.demo.make_sample_case` reuses a complete case it finds there (its
    ``case.json``) and regenerates a partial one, so later calls are instant.
    """
    from mirror_model.demo import make_sample_case

    root = Path(cache_dir) if cache_dir is not None else sample_cache_dir()
    return make_sample_case(root / _CASE_FOLDER)


def load_demo_sample() -> list[Any]:
    """Layer data for napari's File ▸ Open Sample ▸ MIRROR: the demo slide, with its
    expression table and sample id in ``metadata["mirror"]``."""
    from ._layers import slide_layer_data

    case = demo_case()
    extra = {
        "expression_path": str(Path(case.expression_path).resolve()),
        "sample_id": str(case.sample_id),
        "sample_data": True,
    }
    data, kwargs, layer_type = slide_layer_data(
        case.slide_path, name=f"MIRROR demo slide ({case.sample_id})", extra_metadata=extra
    )
    return [(data, kwargs, layer_type)]
