"""Per-slide patch-feature files: ``<slide_id>.h5`` (CLAM/TRIDENT layout) and safe ``.pt``.

Layout written by :func:`write_features` (readable by CLAM- and TRIDENT-style loaders)::

    /features   float32 [N, D]      attrs: encoder, encoder_spec (JSON)
    /coords     int64   [N, 2]      (x, y) tile top-left, level-0 pixels
                                    attrs: patch_size_level0, patch_size (= tile_px),
                                    target_mpp, level0_mpp, patch_level (0), name
    root attrs: format = "mirror-features", format_version, encoder, encoder_spec,
                patch_size_level0, target_mpp, tile_px, slide_path, slide_id,
                slide_width, slide_height, slide_mpp, n_tiles

:func:`read_features` also reads

* **CLAM** files: ``features``/``coords`` at the root; the patching step's ``coords`` attrs
  ``patch_size`` + ``patch_level`` (+ ``downsample``) give the level-0 patch size; CLAM's
  feature files often have no attrs at all (then ``patch_size_level0`` is None).
* **TRIDENT** files: ``coords`` attrs ``patch_size_level0``, ``target_magnification``,
  ``level0_magnification`` ...; features at the root (or under ``features``).
* The authors' per-slide **``.pt``** tensors ``[N, D]`` via ``torch.load(weights_only=True)``
  (a dict with ``features`` / ``coords`` tensors also works). These have no coordinates, so
  ``coords_level0`` is None and no heatmap can be drawn from them. Anything that is not plain
  tensors (a pickled Python object) is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_path
from .errors import FeatureFileError

__all__ = [
    "FORMAT_VERSION",
    "FeatureFile",
    "check_encoder",
    "grid_positions",
    "read_features",
    "write_features",
]

FORMAT_VERSION = 1


@dataclass
class FeatureFile:
    """The patch features of one slide.

    Attributes
    ----------
    features : np.ndarray
        ``[N, D]`` float32.
    coords_level0 : np.ndarray or None
        ``[N, 2]`` int64 (x, y) tile top-left in level-0 pixels; None when the source had
        none (authors' ``.pt`` files) — such files cannot produce heatmaps.
    patch_size_level0 : int or None
        Tile side in level-0 pixels.
    target_mpp : float or None
        µm per pixel the tiles were encoded at.
    encoder : str or None
        Patch-encoder name (see :mod:`mirror_model.patch_encoders`).
    attrs : dict
        Everything else: ``encoder_spec`` (dict), ``slide_path``, ``slide_id``,
        ``slide_width``/``slide_height``, ``slide_mpp``, ``tile_px``, ``source_format``
        (``"mirror"``, ``"clam"``, ``"trident"``, ``"pt"``), and any foreign attrs.
    path : Path or None
        Where it was read from.
    """

    features: np.ndarray
    coords_level0: np.ndarray | None = None
    patch_size_level0: int | None = None
    target_mpp: float | None = None
    encoder: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def encoder_spec(self) -> dict[str, Any] | None:
        spec = self.attrs.get("encoder_spec")
        return dict(spec) if isinstance(spec, dict) else None

    @property
    def has_coords(self) -> bool:
        return self.coords_level0 is not None

    def grid_positions(self) -> np.ndarray:
        """The tiles' lattice cells ``[N, 2]`` int64 (column, row); see :func:`grid_positions`.

        Raises :class:`FeatureFileError` when the file has no coordinates.
        """
        if self.coords_level0 is None:
            raise FeatureFileError(
                f"{self.path or 'feature file'}: holds no tile coordinates, so the tiles' "
                "positions on the slide are unknown; re-extract it with `mirror-train extract` "
                "(which stores them) to use a model that needs tile positions."
            )
        return grid_positions(self.coords_level0, self.patch_size_level0)

    def validate(self, where: str | os.PathLike[str] | None = None) -> FeatureFile:
        """Check shapes and values; raise :class:`FeatureFileError` naming ``where``. Returns self."""
        name = str(where or self.path or "feature file")
        f = np.asarray(self.features)
        if f.ndim != 2:
            raise FeatureFileError(
                f"{name}: features must be a 2-D [tiles, dim] array, got shape {f.shape}."
            )
        if f.shape[0] == 0:
            raise FeatureFileError(
                f"{name}: holds no tiles (features has 0 rows); re-extract the slide."
            )
        if f.shape[1] == 0:
            raise FeatureFileError(f"{name}: features have dimension 0.")
        if not np.issubdtype(f.dtype, np.floating) and not np.issubdtype(f.dtype, np.integer):
            raise FeatureFileError(f"{name}: features have non-numeric type {f.dtype}.")
        f = f.astype(np.float32, copy=False)
        bad = ~np.isfinite(f)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise FeatureFileError(
                f"{name}: {bad.sum()} feature values are NaN or infinite (in {rows.size} tiles, first row {rows[0]}); "
                "re-extract the slide (a failing encoder or a corrupt file)."
            )
        self.features = np.ascontiguousarray(f)
        if self.coords_level0 is not None:
            c = np.asarray(self.coords_level0)
            if c.ndim != 2 or c.shape[1] != 2:
                raise FeatureFileError(
                    f"{name}: coords must be [tiles, 2] (x, y), got shape {c.shape}."
                )
            if c.shape[0] != f.shape[0]:
                raise FeatureFileError(
                    f"{name}: {f.shape[0]} feature rows but {c.shape[0]} coordinates; the file is inconsistent."
                )
            if np.issubdtype(c.dtype, np.floating):
                if not np.isfinite(c).all():
                    raise FeatureFileError(f"{name}: coords contain NaN or infinite values.")
                c = np.rint(c)
            self.coords_level0 = np.ascontiguousarray(c.astype(np.int64))
        if self.patch_size_level0 is not None:
            if not (
                isinstance(self.patch_size_level0, (int, np.integer))
                or float(self.patch_size_level0).is_integer()
            ):
                raise FeatureFileError(
                    f"{name}: patch_size_level0 must be an integer, got {self.patch_size_level0!r}."
                )
            self.patch_size_level0 = int(self.patch_size_level0)
            if self.patch_size_level0 <= 0:
                raise FeatureFileError(
                    f"{name}: patch_size_level0 must be positive, got {self.patch_size_level0}."
                )
        if self.target_mpp is not None:
            self.target_mpp = float(self.target_mpp)
            if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
                raise FeatureFileError(
                    f"{name}: target_mpp must be positive, got {self.target_mpp}."
                )
        return self


def grid_positions(coords_level0: Any, tile_size_level0: int | None = None) -> np.ndarray:
    """Integer lattice cells ``[N, 2]`` int64 (column, row) of tiles at ``coords_level0 [N, 2]``.

    The lattice step is ``tile_size_level0``, or the tiles' spacing when that is smaller (an
    overlapping grid: the smallest positive difference between distinct x or y coordinates,
    if at least half the tile size — smaller differences are jitter). Without a tile size the
    spacing is the step (1 level-0 pixel when undefined, e.g. for a single tile). Cells count from the top-left tile (the minimum coordinate is cell 0).
    Two tiles are neighbours exactly when their cells differ by one.
    """
    c = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    if c.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    steps = [np.diff(np.unique(c[:, i])) for i in (0, 1)]
    steps = [d[d > 0] for d in steps]
    found = [float(d.min()) for d in steps if d.size]
    step = min(found) if found else None
    if tile_size_level0 is not None and tile_size_level0 > 0:
        tile = float(tile_size_level0)
        # spacing above the tile size = missing tiles in between; far below it = jitter
        step = tile if step is None or not 0.5 * tile <= step < tile else step
    if step is None:
        step = 1.0
    return np.rint((c - c.min(axis=0)) / step).astype(np.int64)


# --------------------------------------------------------------------------- writing


def _attr_value(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)) and not (
        isinstance(v, (list, tuple))
        and all(isinstance(x, (int, float, np.integer, np.floating)) for x in v)
    ):
        return json.dumps(v)
    if isinstance(v, Path):
        return str(v)
    return v


def write_features(path: str | os.PathLike[str], ff: FeatureFile) -> Path:
    """Write ``ff`` to an HDF5 file atomically (the file appears only when complete).

    Returns the path written. Raises :class:`FeatureFileError` if ``ff`` is invalid.
    """
    import h5py

    target = Path(path)
    ff.validate(target)
    spec = ff.encoder_spec
    root: dict[str, Any] = {
        "format": "mirror-features",
        "format_version": FORMAT_VERSION,
        "n_tiles": ff.n_tiles,
    }
    if ff.encoder is not None:
        root["encoder"] = ff.encoder
    if ff.patch_size_level0 is not None:
        root["patch_size_level0"] = int(ff.patch_size_level0)
    if ff.target_mpp is not None:
        root["target_mpp"] = float(ff.target_mpp)
    for k, v in ff.attrs.items():
        if k in ("source_format",) or v is None:
            continue
        root[k] = v
    if spec is not None:
        root["encoder_spec"] = json.dumps(spec, sort_keys=True)
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as h5:
            dset = h5.create_dataset("features", data=ff.features.astype(np.float32), chunks=True)
            if ff.encoder is not None:
                dset.attrs["encoder"] = ff.encoder
            if spec is not None:
                dset.attrs["encoder_spec"] = root["encoder_spec"]
            if ff.coords_level0 is not None:
                cset = h5.create_dataset("coords", data=ff.coords_level0.astype(np.int64))
                if ff.patch_size_level0 is not None:
                    cset.attrs["patch_size_level0"] = int(ff.patch_size_level0)
                    cset.attrs["patch_level"] = 0
                if "tile_px" in ff.attrs:
                    cset.attrs["patch_size"] = int(ff.attrs["tile_px"])
                if ff.target_mpp is not None:
                    cset.attrs["target_mpp"] = float(ff.target_mpp)
                if ff.attrs.get("slide_mpp") is not None:
                    cset.attrs["level0_mpp"] = float(ff.attrs["slide_mpp"])
                if ff.attrs.get("slide_id") is not None:
                    cset.attrs["name"] = str(ff.attrs["slide_id"])
            for k, v in root.items():
                h5.attrs[k] = _attr_value(v)
    return target


# --------------------------------------------------------------------------- reading


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def read_features(path: str | os.PathLike[str], *, load_features: bool = True) -> FeatureFile:
    """Read a feature file (our .h5, CLAM .h5, TRIDENT .h5, or a tensor-only .pt).

    Parameters
    ----------
    path : path-like
    load_features : bool
        False skips reading the feature matrix (quick checks of large files): ``features``
        then has shape ``[0, D]`` and ``attrs["n_tiles"]`` holds N; coords and attrs are read
        and shapes are still checked, values are not.

    Raises
    ------
    FeatureFileError
        Missing file, unreadable/corrupt file, missing datasets, inconsistent shapes,
        NaN/inf values, or a ``.pt`` holding something other than tensors.
    """
    p = Path(path)
    if not p.exists():
        raise FeatureFileError(f"{p}: feature file not found.")
    if p.is_dir():
        raise FeatureFileError(f"{p}: is a folder, not a feature file (.h5 or .pt).")
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth"):
        return _read_pt(p)
    return _read_h5(p, load_features=load_features)


def _read_h5(p: Path, load_features: bool = True) -> FeatureFile:
    import h5py

    try:
        h5 = h5py.File(p, "r")
    except Exception as exc:
        raise FeatureFileError(
            f"{p}: not a readable HDF5 feature file ({exc}); it may be truncated — delete it and re-extract."
        ) from None
    try:
        with h5:
            fset = _find_dataset(h5, ("features", "feats", "embeddings"))
            if fset is None:
                raise FeatureFileError(
                    f"{p}: has no 'features' dataset (found: {sorted(h5.keys())}); "
                    "expected the CLAM/TRIDENT layout with 'features' [N, D] and 'coords' [N, 2]."
                )
            cset = _find_dataset(h5, ("coords", "coordinates"))
            root = {k: _plain(v) for k, v in h5.attrs.items()}
            fattrs = {k: _plain(v) for k, v in fset.attrs.items()}
            cattrs = {k: _plain(v) for k, v in cset.attrs.items()} if cset is not None else {}
            try:
                if load_features:
                    feats = np.asarray(fset[()])
                else:
                    feats = np.zeros((0,) + tuple(fset.shape[1:]), np.float32)
                coords = np.asarray(cset[()]) if cset is not None else None
            except Exception as exc:
                raise FeatureFileError(
                    f"{p}: reading the datasets failed ({exc}); the file may be corrupt."
                ) from None
            n_rows = int(fset.shape[0]) if fset.ndim >= 1 else 0
    except FeatureFileError:
        raise
    except Exception as exc:  # h5py errors on damaged files
        raise FeatureFileError(
            f"{p}: the HDF5 file is damaged ({exc}); delete it and re-extract."
        ) from None

    # CLAM stores [1, N, D] in some versions; squeeze a leading singleton
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
        n_rows = feats.shape[0]
    if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]

    if root.get("format") == "mirror-features":
        source = "mirror"
    elif (
        "patch_size_level0" in cattrs
        or "target_magnification" in cattrs
        or "level0_magnification" in cattrs
    ):
        source = "trident"
    else:
        source = "clam"

    patch_size_level0 = _first(root, cattrs, fattrs, key="patch_size_level0")
    if patch_size_level0 is None and "patch_size" in cattrs:
        level = cattrs.get("patch_level")
        ds = cattrs.get("downsample")
        if ds is not None:
            ds_x = float(ds[0]) if isinstance(ds, (list, tuple)) else float(ds)
            patch_size_level0 = round(float(cattrs["patch_size"]) * ds_x)
        elif level is not None and int(level) == 0:
            patch_size_level0 = int(cattrs["patch_size"])
    target_mpp = _first(root, cattrs, fattrs, key="target_mpp")
    if target_mpp is None and source == "trident":
        # TRIDENT records magnification; 10 µm/px at 1x is the usual convention (20x = 0.5 µm/px).
        mag = cattrs.get("target_magnification")
        if mag:
            target_mpp = 10.0 / float(mag)
    encoder = _first(root, fattrs, cattrs, key="encoder")
    attrs: dict[str, Any] = {}
    for src in (cattrs, fattrs, root):
        attrs.update(src)
    attrs["source_format"] = source
    if "encoder_spec" in attrs and isinstance(attrs["encoder_spec"], str):
        try:
            attrs["encoder_spec"] = json.loads(attrs["encoder_spec"])
        except json.JSONDecodeError:
            raise FeatureFileError(f"{p}: the encoder_spec attribute is not valid JSON.") from None
    ff = FeatureFile(
        features=feats,
        coords_level0=coords,
        patch_size_level0=patch_size_level0,
        target_mpp=target_mpp,
        encoder=str(encoder) if encoder is not None else None,
        attrs=attrs,
        path=p,
    )
    if not load_features:
        attrs["n_tiles"] = n_rows
        # the shape first: a 1-D array is the problem, not its row count
        if len(fset.shape) != 2:
            raise FeatureFileError(
                f"{p}: features must be a 2-D [tiles, dim] array, got shape {tuple(fset.shape)}."
            )
        if coords is not None and coords.shape[0] != n_rows:
            raise FeatureFileError(
                f"{p}: {n_rows} feature rows but {coords.shape[0]} coordinates; the file is inconsistent."
            )
        return ff
    return ff.validate(p)


def _find_dataset(h5: Any, names: tuple[str, ...]) -> Any:
    import h5py

    for n in names:
        obj = h5.get(n)
        if isinstance(obj, h5py.Dataset):
            return obj
        if isinstance(obj, h5py.Group):  # e.g. TRIDENT-like groups: features/<encoder>
            dsets = [v for v in obj.values() if isinstance(v, h5py.Dataset)]
            if len(dsets) == 1:
                return dsets[0]
    return None


def _first(*dicts: dict[str, Any], key: str) -> Any:
    for d in dicts:
        if d.get(key) is not None:
            return d[key]
    return None


def _read_pt(p: Path) -> FeatureFile:
    import torch

    from ._io import load_tensors

    obj = load_tensors(
        p, FeatureFileError, ".pt file",
        "Save plain tensors (torch.save(features_tensor, path)) or use the .h5 layout.",
    )  # fmt: skip
    coords = None
    if isinstance(obj, dict):
        feats = obj.get("features", obj.get("feats"))
        coords = obj.get("coords")
        if feats is None:
            raise FeatureFileError(
                f"{p}: the .pt dict has no 'features' tensor (keys: {sorted(map(str, obj))})."
            )
    else:
        feats = obj
    if not isinstance(feats, torch.Tensor):
        raise FeatureFileError(
            f"{p}: expected a [N, D] tensor of features, found {type(feats).__name__}."
        )
    if coords is not None and not isinstance(coords, torch.Tensor):
        raise FeatureFileError(
            f"{p}: 'coords' must be a [N, 2] tensor, found {type(coords).__name__}."
        )
    ff = FeatureFile(
        features=feats.detach().float().numpy(),
        coords_level0=coords.detach().numpy() if coords is not None else None,
        attrs={
            "source_format": "pt",
            "note": "no tile coordinates: attention heatmaps cannot be drawn from this file"
            if coords is None
            else "",
        },
        path=p,
    )
    return ff.validate(p)


# --------------------------------------------------------------------------- compatibility


def check_encoder(
    ff: FeatureFile,
    expected: Any,
    *,
    target_mpp: float | None = None,
    strict: bool = False,
) -> None:
    """Raise :class:`FeatureFileError` when ``ff`` was not made by the ``expected`` encoder.

    Parameters
    ----------
    ff : FeatureFile
    expected : str, PatchEncoderSpec or dict
        An encoder name, or a spec (name and dim; the weights hash too when both record one).
    target_mpp : float, optional
        When given and the file records a target resolution, they must agree within 5 %.
    strict : bool
        Also fail when the file does not record its encoder (foreign CLAM / .pt files);
        otherwise such files pass when their dimension matches.
    """
    where = ff.path or "feature file"
    if isinstance(expected, str):
        exp_name, exp_dim, exp_sha = expected, None, None
    else:
        d = expected.to_dict() if hasattr(expected, "to_dict") else dict(expected)
        exp_name, exp_dim, exp_sha = d.get("name"), d.get("dim"), d.get("weights_sha256")
    if ff.encoder is None:
        if strict:
            raise FeatureFileError(
                f"{where}: the file does not record which patch encoder made it; the model needs "
                f"features from {exp_name!r}. Re-extract with --encoder {exp_name}."
            )
    elif exp_name is not None and ff.encoder.lower() != str(exp_name).lower():
        raise FeatureFileError(
            f"{where}: features come from encoder {ff.encoder!r} (dimension {ff.dim}), but the model was "
            f"trained on {exp_name!r} features; re-extract with --encoder {exp_name}."
        )
    if exp_dim is not None and ff.dim != int(exp_dim):
        raise FeatureFileError(
            f"{where}: features have dimension {ff.dim}, but the model expects {exp_dim} "
            f"(encoder {exp_name!r}); re-extract with --encoder {exp_name}."
        )
    spec = ff.encoder_spec
    if exp_sha and spec and spec.get("weights_sha256") and spec["weights_sha256"] != exp_sha:
        raise FeatureFileError(
            f"{where}: features come from {ff.encoder!r} with different weights "
            f"(sha256 {spec['weights_sha256'][:12]}… vs {exp_sha[:12]}…); re-extract with the model's weights."
        )
    if target_mpp is not None and ff.target_mpp is not None:
        if abs(ff.target_mpp - target_mpp) > 0.05 * target_mpp:
            raise FeatureFileError(
                f"{where}: tiles were encoded at {ff.target_mpp:.3g} µm/px but the model expects "
                f"{target_mpp:.3g} µm/px; re-extract with --target-mpp {target_mpp:g}."
            )
