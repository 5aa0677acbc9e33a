"""Training data: per-slide feature access with caching, seeded tile sampling, batches.

Every batch is a pure function of ``(seed, epoch, step)``: the patient order of an epoch is a
seeded permutation, and the tiles of the patient at position ``i`` of global step ``s`` are drawn
by a ``torch.Generator`` seeded from ``(seed, epoch, s, i)``. Hence a resumed run, a run with
background loading threads and a multi-process run (each rank assembling only its shard) all
see exactly the same tiles.

Tile sampling (per patient and step): ``tiles_per_slide`` tiles without replacement when the
bag has at least that many; otherwise every tile once, in shuffled order — never a tile twice.
A batch is padded to its longest bag and ``Batch.tile_mask`` marks the real tiles (the
encoders ignore the padding), so a cohort of 80-tile slides costs 80 tiles per patient per
step, not ``tiles_per_slide``. Patients with several slides: ``multi_slide="pool"`` (default)
samples from the union of all their slides' tiles, so a patient's bag reflects all of its
tissue; ``"one"`` picks one slide per step (seeded) and samples from it.

Expression-only cohorts: :class:`PatientBags` without a feature store; batches then carry
``features = None`` (the trainer calls the model's RNA-only forward).

Caching: ``feature_cache="memory"`` keeps each slide's ``[N, D]`` features in RAM after the
first read (float32 or bfloat16); ``"lazy"`` reads only the sampled rows from the HDF5 file
each step and keeps whole slides in an LRU cache bounded by ``cache_gb``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatureFileError

__all__ = [
    "Batch",
    "BatchLoader",
    "FeatureStore",
    "PatientBags",
    "SlideInfo",
    "find_feature_files",
    "sample_tile_indices",
    "step_generator",
]

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt")


@dataclass(frozen=True)
class SlideInfo:
    """Header facts of one feature file."""

    slide_id: str
    path: Path
    n_tiles: int
    dim: int
    encoder: str | None


def find_feature_files(
    features_dir: str | os.PathLike[str], slide_ids: Sequence[str]
) -> dict[str, Path]:
    """Map slide ids to ``<features_dir>/<slide_id>.h5`` (or ``.hdf5`` / ``.pt``).

    Raises
    ------
    FeatureFileError
        The folder does not exist, or some slides have no file (all are listed).
    """
    d = Path(features_dir)
    if not d.is_dir():
        raise FeatureFileError(
            f"feature folder {d} does not exist; run `mirror-train extract` first."
        )
    from ..ids import files_by_slide

    found, missing = files_by_slide(d, slide_ids, FEATURE_SUFFIXES)
    if missing:
        shown = ", ".join(missing[:20]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 20 else ""
        )
        raise FeatureFileError(
            f"no feature file in {d} for {len(missing)} slide(s): {shown}. Expected <slide_id>.h5; "
            "run `mirror-train extract` for them or drop them from the cohort table."
        )
    return found


def _read_full(path: Path) -> tuple[np.ndarray, str | None]:
    """Whole feature matrix ``[N, D]`` float32 and encoder name (validated: finite values)."""
    from ..features import read_features

    ff = read_features(path)
    return np.asarray(ff.features, dtype=np.float32), ff.encoder


def _h5_features_dataset(fh: object) -> object | None:
    ds = fh.get("features")  # type: ignore[attr-defined]
    if ds is None or not hasattr(ds, "shape"):
        return None
    if len(ds.shape) == 2 or (len(ds.shape) == 3 and ds.shape[0] == 1):
        return ds
    return None


def _probe(path: Path, slide_id: str) -> SlideInfo:
    """Shape and encoder of a feature file without loading its features."""
    from ..features import read_features

    ff = read_features(path, load_features=False)
    n = int(ff.attrs.get("n_tiles", ff.features.shape[0]))
    return SlideInfo(slide_id, path, n, int(ff.features.shape[1]), ff.encoder)


class FeatureStore:
    """Feature rows of many slides, read on demand and cached.

    Parameters
    ----------
    paths : mapping slide id -> feature file
    mode : {"memory", "lazy"}
    cache_dtype : torch.dtype
        Storage type of cached features (float32 or bfloat16). Returned rows are float32.
    cache_bytes : int or None
        LRU budget for ``lazy`` mode (None = unbounded; ignored in ``memory`` mode).
    """

    def __init__(
        self,
        paths: Mapping[str, Path],
        mode: str = "memory",
        cache_dtype: torch.dtype = torch.float32,
        cache_bytes: int | None = None,
    ) -> None:
        self.paths = {str(k): Path(v) for k, v in paths.items()}
        self.mode = mode
        self.cache_dtype = cache_dtype
        self.cache_bytes = cache_bytes
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._cached_bytes = 0
        self._info: dict[str, SlideInfo] = {}
        self._cells: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- headers ---------------------------------------------------------------
    def info(self, slide_id: str) -> SlideInfo:
        if slide_id not in self._info:
            self._info[slide_id] = _probe(self.paths[slide_id], slide_id)
        return self._info[slide_id]

    def check_consistent(self, slide_ids: Sequence[str]) -> SlideInfo:
        """Probe every slide; all must share one feature dimension and encoder, and have tiles.

        Returns the first slide's info. Raises :class:`FeatureFileError` naming the odd ones.
        """
        infos = [self.info(s) for s in slide_ids]
        empty = [i.slide_id for i in infos if i.n_tiles == 0]
        if empty:
            raise FeatureFileError(
                f"feature files with zero tiles for slide(s) {', '.join(empty[:20])}; re-extract them "
                "(no tissue found?) or drop them from the cohort."
            )
        dims = collections.Counter(i.dim for i in infos)
        encs = collections.Counter(i.encoder for i in infos if i.encoder is not None)
        if len(dims) > 1 or len(encs) > 1:
            parts = []
            for key, counter in (("dim", dims), ("encoder", encs)):
                if len(counter) > 1:
                    major = counter.most_common(1)[0][0]
                    odd = [
                        i for i in infos if getattr(i, key) != major and getattr(i, key) is not None
                    ]
                    parts.append(
                        f"{key}: most files have {major!r} but "
                        + ", ".join(
                            f"{i.slide_id} ({i.path.name}) has {getattr(i, key)!r}"
                            for i in odd[:10]
                        )
                    )
            raise FeatureFileError(
                "feature files come from different patch encoders or dimensions — "
                + "; ".join(parts)
                + ". Extract all slides with one encoder."
            )
        return infos[0]

    def cells(self, slide_id: str) -> torch.Tensor:
        """The slide's tile lattice cells ``[N, 2]`` int64 (column, row), cached.

        Raises :class:`FeatureFileError` for a file without coordinates.
        """
        with self._lock:
            cached = self._cells.get(slide_id)
        if cached is not None:
            return cached
        from ..features import read_features

        ff = read_features(self.paths[slide_id], load_features=False)
        cells = torch.from_numpy(ff.grid_positions())
        with self._lock:
            self._cells[slide_id] = cells
        return cells

    # -- rows ------------------------------------------------------------------
    def _load(self, slide_id: str) -> torch.Tensor:
        with self._lock:
            t = self._cache.get(slide_id)
            if t is not None:
                self._cache.move_to_end(slide_id)
                return t
        feats, _ = _read_full(self.paths[slide_id])
        t = torch.from_numpy(feats).to(self.cache_dtype)
        with self._lock:
            if slide_id not in self._cache:
                self._cache[slide_id] = t
                self._cached_bytes += t.numel() * t.element_size()
                self._evict()
        return t

    def _evict(self) -> None:
        if self.mode != "lazy" or self.cache_bytes is None:
            return
        while self._cached_bytes > self.cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    def _can_cache(self, slide_id: str) -> bool:
        if self.mode == "memory":
            return True
        if self.cache_bytes is None:
            return True
        info = self.info(slide_id)
        nbytes = info.n_tiles * info.dim * torch.tensor([], dtype=self.cache_dtype).element_size()
        return nbytes <= self.cache_bytes

    def full(self, slide_id: str) -> torch.Tensor:
        """All rows ``[N, D]`` float32 of a slide."""
        if self._can_cache(slide_id):
            return self._load(slide_id).float()
        feats, _ = _read_full(self.paths[slide_id])
        return torch.from_numpy(feats)

    def rows(self, slide_id: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (int64, any order, repeats allowed) of a slide as float32 ``[len(idx), D]``."""
        with self._lock:
            cached = self._cache.get(slide_id)
        if (
            cached is None
            and self.mode == "lazy"
            and self.paths[slide_id].suffix in (".h5", ".hdf5")
        ):
            if not self._can_cache(slide_id) or (
                self.cache_bytes is not None and self.cache_bytes == 0
            ):
                return self._read_rows_h5(slide_id, idx)
        if cached is None:
            cached = self._load(slide_id)
        return cached.index_select(0, idx).float()

    def _read_rows_h5(self, slide_id: str, idx: torch.Tensor) -> torch.Tensor:
        import h5py

        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        path = self.paths[slide_id]
        try:
            with h5py.File(path, "r") as fh:
                ds = _h5_features_dataset(fh)
                if ds is not None:
                    sel = uniq.numpy()
                    block = ds[0, sel] if len(ds.shape) == 3 else ds[sel]  # type: ignore[index]
        except (OSError, TypeError) as exc:
            raise FeatureFileError(
                f"feature file {path} (slide {slide_id}) cannot be read: {exc}"
            ) from None
        if ds is None:  # another layout (e.g. a group per encoder): read it whole
            feats, _ = _read_full(path)
            return torch.from_numpy(feats).index_select(0, idx)
        rows = torch.from_numpy(np.asarray(block, dtype=np.float32))
        if not bool(torch.isfinite(rows).all()):
            raise FeatureFileError(
                f"feature file {path} (slide {slide_id}) holds NaN or infinite values; re-extract it."
            )
        return rows[inverse]


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, *parts)`` (independent streams per tuple)."""
    state = np.random.SeedSequence([int(seed), *[int(p) for p in parts]]).generate_state(
        2, dtype=np.uint32
    )
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def sample_tile_indices(n_tiles: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``min(k, n_tiles)`` distinct tile indices in ``[0, n_tiles)``, in random order."""
    if n_tiles <= 0:
        raise ValueError("cannot sample from an empty bag")
    return torch.randperm(n_tiles, generator=generator)[:k]


@dataclass
class Batch:
    """One shard of a global batch."""

    patient_ids: list[str]
    features: torch.Tensor | None  # [b, T, D] float32 (None: expression-only cohort)
    rna: torch.Tensor  # [b, G] float32
    global_size: int  # patients in the whole global batch (all ranks)
    tile_mask: torch.Tensor | None = None  # [b, T] bool, True = real tile (None: all real)
    positions: torch.Tensor | None = None  # [b, T, 2] int64 lattice cells (when requested)


class PatientBags:
    """Patients with their slides and preprocessed expression vectors.

    Parameters
    ----------
    patient_ids : sequence of str
    slides : mapping patient -> list of slide ids (at least one each)
    rna : float32 array ``[P, G]`` aligned with ``patient_ids``
    store : FeatureStore, or None for an expression-only cohort
    """

    def __init__(
        self,
        patient_ids: Sequence[str],
        slides: Mapping[str, Sequence[str]],
        rna: np.ndarray,
        store: FeatureStore | None,
    ) -> None:
        self.patient_ids = [str(p) for p in patient_ids]
        self.slides = {p: list(slides.get(p, [])) for p in self.patient_ids}
        self.rna = torch.as_tensor(np.asarray(rna, dtype=np.float32))
        if self.rna.shape[0] != len(self.patient_ids):
            raise ValueError("rna rows must align with patient_ids")
        self.store = store

    def __len__(self) -> int:
        return len(self.patient_ids)

    def bag(
        self, i: int, n_tiles: int, generator: torch.Generator, multi_slide: str = "pool"
    ) -> torch.Tensor:
        """Sampled features ``[min(n_tiles, tiles of the patient), D]`` of patient ``i``."""
        return self.sample(i, n_tiles, generator, multi_slide)[0]

    def sample(
        self,
        i: int,
        n_tiles: int,
        generator: torch.Generator,
        multi_slide: str = "pool",
        positions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampled features ``[min(n_tiles, tiles of the patient), D]`` of patient ``i`` and,
        if ``positions``, their lattice cells ``[.., 2]`` (the same random draws either way).

        A patient's slides are laid side by side on one lattice (each slide shifted right past
        the previous one with a gap), so tiles of different slides are never neighbours.
        """
        assert self.store is not None, "an expression-only cohort has no tiles"
        sids = self.slides[self.patient_ids[i]]
        if multi_slide == "one" and len(sids) > 1:
            j = int(torch.randint(len(sids), (1,), generator=generator))
            sids = [sids[j]]
        counts = [self.store.info(s).n_tiles for s in sids]
        idx = sample_tile_indices(sum(counts), n_tiles, generator)
        cells = None
        if len(sids) == 1:
            if positions:
                cells = self.store.cells(sids[0]).index_select(0, idx)
            return self.store.rows(sids[0], idx), cells
        # map pooled indices back to (slide, row) and keep the sampled order
        bounds = torch.tensor(np.cumsum([0, *counts]), dtype=torch.int64)
        which = torch.bucketize(idx, bounds[1:], right=True)
        out = torch.empty(idx.numel(), self.store.info(sids[0]).dim, dtype=torch.float32)
        if positions:
            cells = torch.empty(idx.numel(), 2, dtype=torch.int64)
        shift = 0
        for j, s in enumerate(sids):
            m = which == j
            if bool(m.any()):
                out[m] = self.store.rows(s, idx[m] - bounds[j])
            if cells is not None:
                slide_cells = self.store.cells(s)
                if bool(m.any()):
                    cells[m] = slide_cells.index_select(0, idx[m] - bounds[j]) + torch.tensor(
                        [shift, 0]
                    )
                shift += int(slide_cells[:, 0].max()) + 1 + _SLIDE_GAP_CELLS
        return out, cells


#: Empty lattice columns between the slides of one patient (wider than any PPEG kernel's reach).
_SLIDE_GAP_CELLS = 16


class BatchLoader:
    """Deterministic batches over :class:`PatientBags` with optional background assembly.

    Training: each epoch a seeded permutation of the patients is cut into global batches of
    ``batch_size`` (a remainder smaller than ``batch_size`` is dropped — it is reshuffled next
    epoch; with fewer patients than ``batch_size`` one batch of all of them is used).
    Under ``world_size`` processes the training batch is rounded down to a multiple of it.
    Validation (``train=False``): patients in a fixed order, the last smaller batch is **kept**
    (merged into the previous one if it has fewer patients than processes), tiles drawn with a
    fixed seed so every epoch's validation loss uses the same tiles.
    """

    def __init__(
        self,
        bags: PatientBags,
        batch_size: int,
        tiles_per_slide: int,
        seed: int,
        *,
        train: bool = True,
        multi_slide: str = "pool",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        positions: bool = False,
    ) -> None:
        self.positions = positions
        self.bags = bags
        self.batch_size = batch_size
        self.tiles = tiles_per_slide
        self.seed = seed
        self.train = train
        self.multi_slide = multi_slide
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers

    def _val_bounds(self) -> list[tuple[int, int]]:
        n = len(self.bags)
        bounds = [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        # under several processes every rank needs >= 1 patient per batch: merge a short tail
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < self.world_size:
            last = bounds.pop()
            bounds[-1] = (bounds[-1][0], last[1])
        return bounds

    def _train_size(self) -> int:
        size = min(self.batch_size, len(self.bags))
        # equal shards on every rank (the DDP gradient average is then exact)
        return max(self.world_size, size - size % self.world_size)

    def steps_per_epoch(self) -> int:
        if self.train:
            return max(1, len(self.bags) // self._train_size())
        return len(self._val_bounds())

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """Patient positions of global batch ``step`` of ``epoch``."""
        n = len(self.bags)
        if self.train:
            order = torch.randperm(n, generator=step_generator(self.seed, 1, epoch)).tolist()
            size = self._train_size()
            return order[step * size : (step + 1) * size]
        lo, hi = self._val_bounds()[step]
        return list(range(lo, hi))

    def make_batch(self, epoch: int, step: int) -> Batch:
        members = self.global_batch(epoch, step)
        mine = list(range(self.rank, len(members), self.world_size))
        stream = 2 if self.train else 3
        ep = epoch if self.train else 0
        feats, cells, ids = [], [], []
        for pos in mine:
            i = members[pos]
            ids.append(self.bags.patient_ids[i])
            if self.bags.store is not None:
                g = step_generator(self.seed, stream, ep, step, pos)
                f, c = self.bags.sample(i, self.tiles, g, self.multi_slide, self.positions)
                feats.append(f)
                cells.append(c)
        sel = torch.tensor([members[p] for p in mine], dtype=torch.int64)
        rna = self.bags.rna.index_select(0, sel)
        if self.bags.store is None:
            return Batch(ids, None, rna, len(members))
        if not feats:
            return Batch(ids, torch.empty(0, self.tiles, 0), rna, len(members))
        # pad to the longest bag of the batch; the mask keeps padding out of the encoders
        longest = max(f.shape[0] for f in feats)
        x = feats[0].new_zeros(len(feats), longest, feats[0].shape[1])
        mask = torch.zeros(len(feats), longest, dtype=torch.bool)
        pos_t = torch.zeros(len(feats), longest, 2, dtype=torch.int64) if self.positions else None
        for b, f in enumerate(feats):
            x[b, : f.shape[0]] = f
            mask[b, : f.shape[0]] = True
            if pos_t is not None:
                pos_t[b, : f.shape[0]] = cells[b]
        return Batch(ids, x, rna, len(members), None if bool(mask.all()) else mask, pos_t)

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield ``(step, batch)`` for ``start_step .. steps_per_epoch-1`` (prefetching if num_workers>0)."""
        steps = range(start_step, self.steps_per_epoch())
        if self.num_workers <= 0:
            for s in steps:
                yield s, self.make_batch(epoch, s)
            return
        with cf.ThreadPoolExecutor(
            max_workers=self.num_workers, thread_name_prefix="mirror-data"
        ) as pool:
            pending: collections.deque[tuple[int, cf.Future[Batch]]] = collections.deque()
            it = iter(steps)
            for s in it:
                pending.append((s, pool.submit(self.make_batch, epoch, s)))
                if len(pending) >= self.num_workers + 1:
                    break
            while pending:
                s, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self.make_batch, epoch, nxt)))
                yield s, fut.result()
