"""Per-tile maps of a prediction: what each map is (:class:`TileMap`) and how it is computed.

A :class:`~mirror_model.inference.Prediction` of a slide carries ``maps``, an insertion-ordered
``dict[str, TileMap]`` keyed by map name, every map aligned with ``Prediction.coords_level0``:

``"attention"``
    The slide encoder's own per-tile attention (where the encoder looks). Non-negative, sums
    to 1. It answers no clinical question and its orientation is not fixed by training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ATTENTION",
    "DEFAULT_MAP_METHOD",
    "MAP_METHODS",
    "SlideHeads",
    "TileMap",
    "head_maps",
    "rank_tiles",
    "slide_heads",
]

#: Name of the encoder-attention map.
ATTENTION = "attention"


@dataclass(frozen=True, eq=False)
class TileMap:
    """One value per tile of a slide, with what it means.

    Attributes
    ----------
    name : str
        The key in ``Prediction.maps`` (``"attention"``, ``"subtype:<class>"``, ``"risk"``).
    values : np.ndarray
        ``[N]`` float64, read-only, aligned with ``Prediction.coords_level0``.
    label : str
        Short text for a selector (e.g. ``"Evidence for solid"``).
    description : str
        One sentence: what the map means and which direction is "more".
    signed : bool
        True when negative values mean evidence against (draw with a diverging colour map
        centred on 0); False for non-negative maps.
    method : str
        How the values were computed.
    units : str
        Unit of ``values``.
    """

    name: str
    values: np.ndarray
    label: str
    description: str
    signed: bool
    method: str
    units: str

    def __post_init__(self) -> None:
        v = np.array(self.values, dtype=np.float64).reshape(-1)
        v.flags.writeable = False
        object.__setattr__(self, "values", v)

    @property
    def n_tiles(self) -> int:
        return int(self.values.size)

    def display_range(self, percentile: float = 99.0) -> tuple[float, float]:
        """A colour range that a few extreme tiles do not squash.

        Signed maps: ``(-a, a)`` with ``a`` the ``percentile``-th percentile of ``|values|``
        (0 stays the centre of the colour map). Unsigned maps: the ``100 - percentile`` and
        ``percentile`` percentiles. Non-finite values are ignored; an empty or constant map
        gives a range of width > 0 around its value.
        """
        v = self.values[np.isfinite(self.values)]
        if v.size == 0:
            return (-1.0, 1.0) if self.signed else (0.0, 1.0)
        if self.signed:
            a = float(np.percentile(np.abs(v), percentile))
            a = a if a > 0 else float(np.abs(v).max()) or 1.0
            return (-a, a)
        lo, hi = (float(x) for x in np.percentile(v, [100.0 - percentile, percentile]))
        if hi <= lo:
            lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + (abs(lo) or 1.0)
        return (lo, hi)


def attention_map(attention: np.ndarray, source: str) -> TileMap:
    """The encoder-attention :class:`TileMap` (weights summing to 1, from ``source``)."""
    return TileMap(
        name=ATTENTION,
        values=attention,
        label="Attention (where the encoder looks)",
        description=(
            "Share of the slide encoder's attention that goes to each tile (sums to 1); higher = "
            "the encoder reads the tile more. It is not evidence for a subtype or for risk, and "
            "self-supervised training does not fix which tissue it favours."
        ),
        signed=False,
        method=source,
        units="attention weight (sums to 1 over the tiles)",
    )


# --------------------------------------------------------------------------------------------
# the bundle's heads as affine functions of the slide embedding
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SlideHeads:
    """A bundle's heads for one input kind, written as affine functions of the slide embedding.

    Both heads of a bundle are affine in their input (the subtype probe's logits and the Cox
    linear predictor), so for a fixed expression profile they are affine in the slide
    embedding ``s [D]``: ``logits = logit_weights @ s + logit_offsets`` (probabilities =
    softmax of the logits) and ``risk = risk_weights @ s + risk_offset``. With input kind
    ``"both"`` the expression's part is folded into the offsets.

    Attributes
    ----------
    kind : str
        The head input kind (``"slide"`` or ``"both"``).
    classes : tuple of str
        Class names, rows of ``logit_weights`` (empty without a subtype head).
    logit_weights : np.ndarray or None
        ``[C, D]`` float64; two-class probes get the row of the first class set to 0 (the
        probe's logit is that of the second class against the first).
    logit_offsets : np.ndarray or None
        ``[C]``.
    risk_weights : np.ndarray or None
        ``[D]`` float64 (None without a survival head).
    risk_offset : float
    """

    kind: str
    classes: tuple[str, ...]
    logit_weights: np.ndarray | None
    logit_offsets: np.ndarray | None
    risk_weights: np.ndarray | None
    risk_offset: float = 0.0

    def logits(self, s: np.ndarray) -> np.ndarray:
        """``[..., C]`` logits of slide embeddings ``s [..., D]``."""
        assert self.logit_weights is not None and self.logit_offsets is not None
        return np.asarray(s, np.float64) @ self.logit_weights.T + self.logit_offsets

    def probabilities(self, s: np.ndarray) -> np.ndarray:
        """``[..., C]`` class probabilities (softmax of :meth:`logits`)."""
        z = self.logits(s)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def risk(self, s: np.ndarray) -> np.ndarray:
        """``[...]`` Cox risk (higher = worse prognosis) of slide embeddings ``s [..., D]``."""
        assert self.risk_weights is not None
        return np.asarray(s, np.float64) @ self.risk_weights + self.risk_offset


def slide_heads(
    bundle: Any, kind: str = "slide", rna_embedding: np.ndarray | None = None
) -> SlideHeads:
    """The heads of ``bundle`` for input ``kind`` as :class:`SlideHeads`.

    ``kind="both"`` needs the patient's ``rna_embedding [D_rna]`` (it sets the offsets). The
    affine maps are read off the heads' own prediction functions (at 0 and at every unit
    vector of the slide part), so they hold for any affine head; a head that is not affine in
    the embedding raises ``ValueError``.
    """
    if kind not in ("slide", "both"):
        raise ValueError(f"slide heads exist for input 'slide' or 'both', not {kind!r}")
    if kind == "both" and rna_embedding is None:
        raise ValueError("input kind 'both' needs the RNA embedding")
    probe = bundle.head(kind, "subtype")
    cox = bundle.head(kind, "survival")
    width = (probe if probe is not None else cox).mean_.shape[0]
    r = np.zeros(0) if kind == "slide" else np.asarray(rna_embedding, np.float64).reshape(-1)
    d = width - r.size
    # rows: the slide embedding 0, then each unit vector, then one random check point
    s = np.vstack([np.zeros(d), np.eye(d), np.random.default_rng(0).normal(size=d)])
    z = np.hstack([s, np.broadcast_to(r, (s.shape[0], r.size))])

    def affine(values: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        off = values[0]
        w = values[1 : d + 1] - off  # [D, ...]
        if not np.allclose(s[-1] @ w + off, values[-1], rtol=1e-6, atol=1e-8):
            raise ValueError(f"the {what} head of {bundle.name} is not affine in the embedding")
        return w.T, off

    classes: tuple[str, ...] = ()
    lw = lo = None
    if probe is not None:
        logits = np.asarray(probe.decision_function(z), np.float64)
        names = [str(c) for c in np.asarray(probe.classes_).tolist()]
        if logits.ndim == 1:  # two classes: the logit of names[1] against names[0]
            logits = np.stack([np.zeros_like(logits), logits], axis=1)
        w, off = affine(logits, "subtype")
        order = [c for c in (bundle.class_names or names) if c in names]
        idx = [names.index(c) for c in order]
        classes, lw, lo = tuple(order), w[idx], off[idx]
    rw = None
    ro = 0.0
    if cox is not None:
        w, off = affine(np.asarray(cox.predict_risk(z), np.float64), "survival")
        rw, ro = w, float(off)
    return SlideHeads(kind, classes, lw, lo, rw, ro)


def rank_tiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank (1 = highest; ties: lower tile index first; NaN last) and percentile (0–100,
    100 = highest, 0 = lowest, ties share their mean rank, NaN stays NaN) of every tile."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = v.size
    order = np.lexsort((np.arange(n), -np.nan_to_num(v, nan=-np.inf), np.isnan(v)))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    pct = np.full(n, np.nan)
    ok = np.isfinite(v)
    k = int(ok.sum())
    if k == 1:
        pct[ok] = 100.0
    elif k > 1:
        from scipy.stats import rankdata

        pct[ok] = (rankdata(v[ok], method="average") - 1.0) / (k - 1) * 100.0
    return rank, pct


# --------------------------------------------------------------------------------------------
# attribution through the frozen slide encoder
# --------------------------------------------------------------------------------------------
def attribute_tiles(
    model: Any,
    features: Any,
    directions: Any,
    *,
    steps: int = 1,
    precision: str = "fp32",
    positions: Any = None,
    should_stop: Any = None,
) -> np.ndarray:
    """Per-tile attribution of linear read-outs of the slide embedding.

    For every read-out ``f_k(X) = directions[k] · s(X)`` of the slide embedding ``s`` of the
    tile features ``X [N, D_p]``, tile ``i`` gets ``(x_i − b) · ∂f_k/∂x_i`` averaged along
    the straight path from ``b`` to ``X`` (integrated gradients with ``steps`` midpoint steps;
    ``steps=1`` is gradient × input taken at the midpoint), where the baseline ``b`` is the
    slide's mean tile. Summed over the tiles it approximates ``f_k(X) − f_k(b)``: the map
    shows which tiles make the read-out differ from what an average tile of the same slide
    would give.

    Parameters
    ----------
    model : a MirrorModel (``encode_slide``) in eval mode.
    features : ``[N, D_p]`` tensor on the model's device.
    directions : ``[K, D]`` read-out directions (tensor or array).
    steps : path steps (1 = gradient × input).
    precision : "fp32" or "bf16" (autocast).
    positions : ``[N, 2]`` lattice cells of the tiles, passed to encoders that need them
        (``model.needs_positions``); ignored otherwise.
    should_stop : polled between backward passes (raises Cancelled).

    Returns
    -------
    np.ndarray
        ``[K, N]`` float64.
    """
    import torch

    from ._device import autocast
    from ._progress import check_cancel

    x = features
    dev = x.device
    w = torch.as_tensor(np.asarray(directions, dtype=np.float32), device=dev)
    kw = encoder_kwargs(model, positions, x.shape[0], dev)
    base = x.mean(dim=0, keepdim=True)
    delta = x - base
    total = torch.zeros(w.shape[0], x.shape[0], dtype=torch.float64, device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # only the input's gradient is needed
        p.requires_grad_(False)
    try:
        for alpha in (np.arange(steps) + 0.5) / steps:
            check_cancel(should_stop, "maps")
            xa = (base + float(alpha) * delta).requires_grad_(True)
            with torch.enable_grad(), autocast(dev, precision):
                out = model.encode_slide(xa, **kw).embedding[0].float() @ w.T
            for k in range(w.shape[0]):
                (g,) = torch.autograd.grad(out[k], xa, retain_graph=k < w.shape[0] - 1)
                total[k] += (g.float() * delta).sum(dim=1).double()
                check_cancel(should_stop, "maps")
    finally:
        for p in params:
            p.requires_grad_(True)
    return (total / steps).cpu().numpy()


def encoder_kwargs(model: Any, positions: Any, n_tiles: int, device: Any) -> dict[str, Any]:
    """``encode_slide`` keywords for a bag of ``n_tiles``: ``positions=`` ``[N, 2]`` lattice
    cells when the model's slide encoder needs them (``model.needs_positions``), else none."""
    if not getattr(model, "needs_positions", False):
        return {}
    import torch

    if positions is None:
        raise ValueError("this slide encoder needs the tiles' lattice cells (positions=)")
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.long, device=device)
    if tuple(pos.shape) != (n_tiles, 2):
        raise ValueError(f"positions must have shape ({n_tiles}, 2); got {tuple(pos.shape)}")
    return {"positions": pos}


RISK = "risk"
SUBTYPE_PREFIX = "subtype:"
_HEAD_INPUT = {"slide": "the slide-only heads", "both": "the slide + expression heads (the expression's part held fixed)"}


def tile_alone_scores(
    model: Any,
    features: Any,
    directions: Any,
    *,
    batch_size: int = 4096,
    precision: str = "fp32",
    should_stop: Any = None,
) -> np.ndarray:
    """Read-outs of every tile encoded as a slide of its own, centred on the slide's mean.

    Each tile ``i`` is passed through the frozen slide encoder as a one-tile bag, giving the
    embedding ``s({x_i})`` of "a slide made of this tissue"; the read-outs
    ``directions[k] · s({x_i})`` minus their mean over the slide's tiles are returned. One
    batched forward pass for all read-outs (no gradients), so the cost does not grow with
    their number. An encoder that needs tile positions gets lattice cell (0, 0) for each
    one-tile slide (it has no neighbours).

    Returns
    -------
    np.ndarray
        ``[K, N]`` float64.
    """
    import torch

    from ._device import autocast
    from ._progress import check_cancel

    x = features
    w = torch.as_tensor(np.asarray(directions, dtype=np.float32), device=x.device)
    out = torch.empty(w.shape[0], x.shape[0], dtype=torch.float64)
    needs = bool(getattr(model, "needs_positions", False))
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            check_cancel(should_stop, "maps")
            xb = x[i : i + batch_size, None, :]
            # a one-tile slide sits in lattice cell (0, 0)
            kw = {"positions": xb.new_zeros(xb.shape[0], 1, 2, dtype=torch.long)} if needs else {}
            with autocast(x.device, precision):
                emb = model.encode_slide(xb, **kw).embedding
            out[:, i : i + batch_size] = (emb.float() @ w.T).T.double().cpu()
    vals = out.numpy()
    return vals - vals.mean(axis=1, keepdims=True)


#: Map methods of :func:`head_maps`.
MAP_METHODS = ("tile-alone", "gradient")
#: The method ``predict`` and ``mirror-train heatmaps`` use unless told otherwise (chosen by
#: measurement: README, "Per-tile maps").
DEFAULT_MAP_METHOD = "tile-alone"


def head_maps(
    model: Any,
    features: Any,
    heads: SlideHeads,
    *,
    method: str = DEFAULT_MAP_METHOD,
    steps: int = 1,
    precision: str = "fp32",
    positions: Any = None,
    should_stop: Any = None,
) -> dict[str, TileMap]:
    """The maps of the displayed outputs: ``"subtype:<class>"`` per class, then ``"risk"``.

    ``features`` is the slide's ``[N, D_p]`` tensor on the model's device. Subtype maps explain
    the centred logit of their class (its logit minus the mean of all class logits: the log-odds
    of that class against the average class); they sum to zero over the classes, so the last
    one is computed as minus the sum of the others (attribution is linear in the read-out). The
    risk map explains the Cox risk score.

    ``method``: ``"tile-alone"`` (:func:`tile_alone_scores`) or ``"gradient"``
    (:func:`attribute_tiles`, ``steps`` > 1 = integrated gradients). ``positions``: the tiles'
    ``[N, 2]`` lattice cells, for encoders that need them (see :func:`encoder_kwargs`).
    """
    dirs: list[np.ndarray] = []
    if heads.logit_weights is not None:
        centred = heads.logit_weights - heads.logit_weights.mean(axis=0, keepdims=True)
        dirs.extend(centred[:-1])
    if heads.risk_weights is not None:
        dirs.append(heads.risk_weights)
    if not dirs:
        return {}
    if method == "tile-alone":
        vals = tile_alone_scores(
            model, features, np.stack(dirs), precision=precision, should_stop=should_stop
        )
        how = (
            "each tile encoded alone by the frozen slide encoder (a one-tile slide) and read by "
            "the head, minus the slide's mean over tiles"
        )
    elif method == "gradient":
        vals = attribute_tiles(
            model, features, np.stack(dirs), steps=steps, precision=precision,
            positions=positions, should_stop=should_stop,
        )
        how = (
            "gradient × input through the frozen slide encoder"
            if steps == 1
            else f"integrated gradients ({steps} steps) through the frozen slide encoder"
        ) + ", baseline = the slide's mean tile"
    else:
        raise ValueError(f"map method must be one of {', '.join(MAP_METHODS)}; got {method!r}")
    used = _HEAD_INPUT[heads.kind]
    out: dict[str, TileMap] = {}
    if heads.logit_weights is not None:
        c = len(heads.classes)
        sub = np.vstack([vals[: c - 1], -vals[: c - 1].sum(axis=0, keepdims=True)])
        for cls, v in zip(heads.classes, sub, strict=True):
            out[f"{SUBTYPE_PREFIX}{cls}"] = TileMap(
                name=f"{SUBTYPE_PREFIX}{cls}",
                values=v,
                label=f"Evidence for {cls}",
                description=(
                    f"How much each tile raises (> 0) or lowers (< 0) the model's log-odds of "
                    f"{cls} against the average subtype, compared with an average tile of this "
                    f"slide; explains {used}."
                ),
                signed=True,
                method=how,
                units="log-odds (logit) units",
            )
    if heads.risk_weights is not None:
        out[RISK] = TileMap(
            name=RISK,
            values=vals[-1],
            label="Evidence for higher risk",
            description=(
                "How much each tile raises (> 0, towards a worse prognosis) or lowers (< 0) the "
                "survival risk score, compared with an average tile of this slide; explains "
                f"{used}."
            ),
            signed=True,
            method=how,
            units="Cox risk-score (log hazard ratio) units",
        )
    return out
