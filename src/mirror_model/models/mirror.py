"""The MIRROR model: two encoders plus alignment, retention and style clustering (design §1.2–§1.7).

:class:`MirrorModel` is built from a :class:`~mirror_model.config.ModelConfig`. Loss terms with
weight 0 are not computed and their modules are not built, so every parameter of every preset
receives a gradient (DistributedDataParallel needs no ``find_unused_parameters``).

Retention positional embeddings: the slide retention decoder adds fixed sinusoidal embeddings of
the token index (CLS = 0, tiles 1..N in compact order). They are defined for any N, unlike the
authors' learned table of 2049 rows, and carry no spatial meaning (the tiles are in random order,
as in the authors' setup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..layers import (
    NystromLayer,
    chunk_transformer,
    gather_rows,
    sinusoidal_positions,
    xavier_init_linears,
)
from ..losses import clip_loss, gaussian_kl, retention_loss, symmetric_kl
from ._common import check_rna, nystrom_layer_kwargs, sample_masks, to_input_order

__all__ = [
    "MirrorModel",
    "MirrorOutput",
    "RetentionResult",
    "RNARetention",
    "SlideEncoding",
    "SlideRetention",
    "StyleClustering",
    "StyleResult",
]


# ---------------------------------------------------------------------- result objects
@dataclass
class SlideEncoding:
    """Frozen-inference slide result.

    Attributes
    ----------
    embedding
        ``[B, D]`` slide embedding (before the alignment head). A single slide given as
        ``[N, D_p]`` gives ``B = 1``.
    attention
        ``[B, N]`` per-tile attention in input order, non-negative, summing to 1 over the real
        tiles, 0 at masked tiles.
    """

    embedding: Tensor
    attention: Tensor


@dataclass
class RetentionResult:
    """Prediction of a retention decoder, its target and the realised mask.

    Attributes
    ----------
    pred, target
        RNA branch: ``[B, D]``. Slide branch: ``[B, M, D]``, the prediction and the encoder's
        token at the masked tiles only (the decoder computes no other output): row j of
        sample b is the compact tile position ``positions[b, j]``.
    mask
        The realised mask, True = masked (a reconstruction target): ``[B, D]`` (RNA), ``[B, Nc]``
        over the compact tiles (slide).
    positions
        Slide branch: ``[B, M]`` compact tile positions of the rows of ``pred`` / ``target``;
        M is the batch's largest masked count, and a sample with fewer masked tiles fills its
        last rows with other positions, which ``row_valid`` marks False.
    row_valid
        Slide branch: ``[B, M]`` bool, True for the rows that are reconstruction targets.
    """

    pred: Tensor
    target: Tensor
    mask: Tensor
    positions: Tensor | None = None
    row_valid: Tensor | None = None

    def loss(self) -> Tensor:
        """The retention loss: mean squared error over the reconstruction targets
        (:func:`~mirror_model.losses.retention_loss`)."""
        weights = self.mask if self.row_valid is None else self.row_valid
        return retention_loss(self.pred, self.target, weights)


@dataclass
class StyleResult:
    """Style-clustering outputs for one modality.

    Attributes
    ----------
    mu, logvar
        ``[B, latent_dim]`` posterior mean and log-variance of the style latent.
    scores
        ``[B, K]`` prototype logits; the posterior is ``softmax(scores)``.
    """

    mu: Tensor
    logvar: Tensor
    scores: Tensor


@dataclass
class MirrorOutput:
    """Output of :meth:`MirrorModel.forward`.

    Attributes
    ----------
    loss
        Weighted total loss (float32 scalar).
    losses
        ``{name: unweighted term}`` for the active terms (``align, ret_slide, ret_rna, style,
        cluster``).
    slide_embedding, rna_embedding
        ``[B, D]`` encoder outputs (before the alignment heads).
    attention
        ``[B, N]`` per-tile slide attention (input order; sums to 1 over real tiles).
    slide_projection, rna_projection
        ``[B, D]`` alignment-head outputs (None when alignment is off).
    logit_scale
        s = min(exp(t), logit_scale_max) (None when alignment is off).
    slide_retention_mask
        ``[B, N]`` bool, True at the tiles the slide retention branch masked (input order).
    rna_retention_mask
        ``[B, D]`` bool, True at the masked RNA-embedding coordinates.
    slide_style, rna_style
        :class:`StyleResult` per modality (None when style clustering is off).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    slide_embedding: Tensor
    rna_embedding: Tensor
    attention: Tensor
    slide_projection: Tensor | None = None
    rna_projection: Tensor | None = None
    logit_scale: Tensor | None = None
    slide_retention_mask: Tensor | None = None
    rna_retention_mask: Tensor | None = None
    slide_style: StyleResult | None = None
    rna_style: StyleResult | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def start(
        cls, rna_embedding: Tensor, slide_embedding: Any = None, attention: Any = None
    ) -> MirrorOutput:
        """An output with no loss term yet (``loss`` a float32 zero on the embeddings' device)."""
        return cls(
            loss=rna_embedding.new_zeros((), dtype=torch.float32),
            losses={},
            slide_embedding=slide_embedding,
            rna_embedding=rna_embedding,
            attention=attention,
        )

    def add_weighted_terms(self, weights: dict[str, float]) -> None:
        """``loss`` += Σ weights[name] · term over :attr:`losses` (each term in float32)."""
        self.loss = sum((weights[n] * v.float() for n, v in self.losses.items()), self.loss)


# ---------------------------------------------------------------------- retention branches
class SlideRetention(nn.Module):
    """Masked latent reconstruction of the slide tokens (design §1.5).

    ``Linear(D→D)`` of [CLS, tiles] → a random ``slide_mask_ratio`` share of the real tile tokens
    replaced by one learned mask token → + sinusoidal positions → ``slide_decoder_depth`` Nyström
    layers → LayerNorm → ``Linear(D→D)``. The prediction is compared with the encoder's own tile
    tokens at the masked positions.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.ratio = config.slide_mask_ratio
        self.embed = nn.Linear(d, d)
        self.mask_token = nn.Parameter(torch.empty(1, 1, d))
        nn.init.normal_(self.mask_token, std=0.02)
        self.layers = nn.ModuleList(
            NystromLayer(d, **nystrom_layer_kwargs(config)) for _ in range(config.slide_decoder_depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)
        xavier_init_linears(self)  # as the authors' slide branch

    def forward(
        self,
        cls: Tensor,
        tokens: Tensor,
        lengths: Tensor,
        uniform: bool,
        stop_gradient: bool = False,
        generator: torch.Generator | None = None,
    ) -> RetentionResult:
        """Reconstruct ``tokens [B, Nc, D]`` (compact layout, ``lengths`` real per row).

        ``cls [B, D]`` is the encoder's CLS output (never masked). Returns the mask ``[B, Nc]``
        and, at the masked tiles only, the prediction and the target (the tokens, detached if
        ``stop_gradient``): ``[B, M, D]`` with their ``positions`` (see
        :class:`RetentionResult`).

        Only what the loss reads is computed: the input embedding of the CLS token and the kept
        tiles (a masked tile's embedding is replaced by the mask token), and in the last layer
        the queries, attention rows, output projection and head of the masked tiles. The loss
        equals that of decoding every position and reading the masked ones (tested).
        """
        bsz, n, d = tokens.shape
        mask = sample_masks(lengths, n, self.ratio, generator=generator)
        # stable sorts: kept (resp. masked) tiles first, each in position order
        kept_first = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        masked_first = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
        n_masked = mask.sum(dim=1)
        n_kept = int((n - n_masked).max())
        m = max(1, int(n_masked.max()))

        kept_pos = kept_first[:, :n_kept]
        emb = self.embed(torch.cat([cls[:, None], gather_rows(tokens, kept_pos)], dim=1))
        tiles = self.mask_token.to(emb.dtype).expand(bsz, n, d)
        tiles = tiles.scatter(1, kept_pos[:, :, None].expand(-1, -1, d), emb[:, 1:])
        # rows with fewer kept tiles than n_kept scattered some masked tiles' embeddings too
        tiles = torch.where(mask[..., None], self.mask_token.to(tiles.dtype), tiles)
        x = torch.cat([emb[:, :1], tiles], dim=1)
        x = x + sinusoidal_positions(n + 1, d, device=x.device, dtype=x.dtype)

        seq_lengths = None if uniform else lengths + 1
        positions = masked_first[:, :m]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, lengths=seq_lengths, query_index=positions + 1 if i == last else None).out
        if not self.layers:
            x = gather_rows(x, positions + 1)
        pred = self.head(self.norm(x))
        target = gather_rows(tokens.detach() if stop_gradient else tokens, positions)
        row_valid = torch.arange(m, device=mask.device)[None, :] < n_masked[:, None]
        return RetentionResult(
            pred=pred, target=target, mask=mask, positions=positions, row_valid=row_valid
        )


class RNARetention(nn.Module):
    """Masked latent reconstruction of the RNA embedding (design §1.5).

    ``Linear(D→D)`` → a random ``rna_mask_ratio`` share of the coordinates replaced by one learned
    scalar → + learned vector → ``rna_decoder_depth`` transformer blocks → LayerNorm →
    ``Linear(D→D)``; compared with the embedding at the masked coordinates.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.ratio = config.rna_mask_ratio
        self.embed = nn.Linear(d, d)
        self.mask_value = nn.Parameter(torch.empty(1))
        nn.init.normal_(self.mask_value, std=0.02)
        self.pos_embed, self.blocks, self.norm = chunk_transformer(
            d, config.rna_heads, config.rna_mlp_ratio, config.rna_dropout, config.rna_decoder_depth
        )
        self.head = nn.Linear(d, d)
        # authors' decoder-block init: output projections scaled by 1/sqrt(2 * layer index)
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def forward(
        self,
        embedding: Tensor,
        stop_gradient: bool = False,
        generator: torch.Generator | None = None,
    ) -> RetentionResult:
        """Reconstruct ``embedding [B, D]``; returns prediction, target (detached if
        ``stop_gradient``) and mask ``[B, D]``."""
        bsz, d = embedding.shape
        x = self.embed(embedding)
        lengths = torch.full((bsz,), d, dtype=torch.long, device=x.device)
        mask = sample_masks(lengths, d, self.ratio, generator=generator)
        x = torch.where(mask, self.mask_value.to(x.dtype), x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        pred = self.head(self.norm(x))
        target = embedding.detach() if stop_gradient else embedding
        return RetentionResult(pred=pred, target=target, mask=mask)


# ---------------------------------------------------------------------- style clustering
class StyleClustering(nn.Module):
    """Shared stochastic bottleneck + prototypes (design §1.6).

    ``MLP D→512→256 (GELU between)`` → μ, log σ² by ``Linear(256→latent)`` each →
    z = μ + σ·ε in training, z = μ in eval → ``Linear(latent→D)`` → prototype logits
    ``y Cᵀ`` with K prototypes C (orthogonal init; :meth:`renormalize_prototypes` makes the rows
    unit length and is called by the trainer before every optimisation step).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.embed_dim
        for i, hidden in enumerate(config.style_hidden_dims):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width, hidden))
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.mu = nn.Linear(width, config.latent_dim)
        self.logvar = nn.Linear(width, config.latent_dim)
        self.decoder = nn.Linear(config.latent_dim, config.embed_dim)
        self.prototypes = nn.Linear(config.embed_dim, config.n_prototypes, bias=False)
        nn.init.orthogonal_(self.prototypes.weight)

    def forward(self, embedding: Tensor) -> StyleResult:
        """Style posterior and prototype logits of ``embedding [B, D]``."""
        hidden = self.mlp(embedding)
        mu = self.mu(hidden)
        logvar = self.logvar(hidden)
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        else:
            z = mu
        scores = self.prototypes(self.decoder(z))
        return StyleResult(mu=mu, logvar=logvar, scores=scores)

    @torch.no_grad()
    def renormalize_prototypes(self) -> None:
        """Scale every prototype (row of C) to unit L2 norm, in place."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))


# ---------------------------------------------------------------------- the model
class MirrorModel(nn.Module):
    """Slide and RNA encoders with MIRROR's pretraining objectives.

    Parameters
    ----------
    config
        The :class:`ModelConfig` (kept as ``model.config``).
    training_parts
        Build the modules only pretraining uses (alignment heads and logit scale, retention
        decoders, style clustering with its prototypes). ``False`` gives the inference model:
        the two encoders only (what a ``.mirror`` bundle stores); its :meth:`forward` raises.

    Notes
    -----
    Call ``model.eval()`` before inference: dropout is active in training mode and the style
    bottleneck samples its latent.
    """

    def __init__(self, config: ModelConfig, training_parts: bool = True) -> None:
        super().__init__()
        from . import create_rna_encoder, create_slide_encoder

        self.config = config
        self.training_parts = bool(training_parts)
        d = config.embed_dim
        self.slide_encoder = create_slide_encoder(config)
        self.rna_encoder = create_rna_encoder(config)
        if not training_parts:
            self.slide_head = self.rna_head = None
            self.logit_scale = None
            self.slide_retention = self.rna_retention = None
            self.style = None
            return
        if config.weight_align > 0:
            self.slide_head: nn.Linear | None = nn.Linear(d, d)
            self.rna_head: nn.Linear | None = nn.Linear(d, d)
            xavier_init_linears(self.slide_head)  # part of the authors' slide branch
            self.logit_scale: nn.Parameter | None = nn.Parameter(
                torch.tensor(float(config.logit_scale_init))
            )
        else:
            self.slide_head = self.rna_head = None
            self.logit_scale = None
        self.slide_retention = SlideRetention(config) if config.weight_ret_slide > 0 else None
        self.rna_retention = RNARetention(config) if config.weight_ret_rna > 0 else None
        self.style = StyleClustering(config) if config.use_style_module else None

    # ------------------------------------------------------------------ inference
    @property
    def needs_positions(self) -> bool:
        """Whether the slide encoder needs the tiles' lattice cells (``positions=``)."""
        return self.config.slide_encoder == "transmil" and self.config.ppeg_layout == "grid"

    def encode_slide(
        self, features: Tensor, tile_mask: Tensor | None = None, positions: Tensor | None = None
    ) -> SlideEncoding:
        """Slide embedding and per-tile attention of ``features [B, N, D_p]`` or ``[N, D_p]``.

        ``positions [B, N, 2]`` (or ``[N, 2]``): the tiles' integer lattice cells (column, row),
        from :func:`mirror_model.features.grid_positions`; needed when :attr:`needs_positions`,
        ignored otherwise. Returns :class:`SlideEncoding` with ``embedding [B, D]`` and
        ``attention [B, N]`` (B = 1 for a 2-D input). Works without any expression input.
        """
        out = self._encode(features, tile_mask, positions=positions)
        return SlideEncoding(embedding=out.embedding, attention=out.attention)

    def encode_rna(self, rna: Tensor) -> Tensor:
        """RNA embedding ``[B, D]`` of normalised expression ``rna [B, G]`` or ``[G]``."""
        rna = check_rna(rna, self.config.n_genes, self._param_device())
        rna = rna.to(self._param_dtype()) if not torch.is_autocast_enabled() else rna
        return self.rna_encoder(rna)

    def project_slide(self, embedding: Tensor) -> Tensor:
        """Alignment-space slide vector: the head applied to the L2-normalised embedding."""
        return self._project(embedding, self.slide_head)

    def project_rna(self, embedding: Tensor) -> Tensor:
        """Alignment-space RNA vector: the head applied to the L2-normalised embedding."""
        return self._project(embedding, self.rna_head)

    def current_logit_scale(self) -> Tensor:
        """s = exp(t) clamped to ``logit_scale_max`` (gradient is 0 above the cap)."""
        if self.logit_scale is None:
            raise RuntimeError("this model has no alignment branch (weight_align = 0)")
        cap = torch.log(torch.tensor(self.config.logit_scale_max, device=self.logit_scale.device))
        return torch.minimum(self.logit_scale, cap).exp()

    def renormalize_prototypes(self) -> None:
        """Unit-normalise the style prototypes (no-op without style clustering)."""
        if self.style is not None:
            self.style.renormalize_prototypes()

    # ------------------------------------------------------------------ training
    def forward(
        self,
        features: Tensor,
        rna: Tensor,
        tile_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        positions: Tensor | None = None,
    ) -> MirrorOutput:
        """Pretraining forward pass on a paired batch.

        Parameters
        ----------
        features
            ``[B, N, D_p]`` tile features (``[N, D_p]`` for B = 1).
        rna
            ``[B, G]`` normalised expression of the same patients, row-aligned with features.
        tile_mask
            ``[B, N]`` bool, True = real tile; None = all real.
        generator
            Random generator (on the model's device) for the retention masks, e.g. a freshly
            seeded one for a reproducible validation loss; None uses torch's global RNG.
        positions
            ``[B, N, 2]`` lattice cells of the tiles (see :meth:`encode_slide`).
        """
        cfg = self.config
        if not self.training_parts:
            raise RuntimeError(
                "this is an inference model (the encoders of a bundle, without the pretraining "
                "heads, decoders and prototypes): use encode_slide() / encode_rna(), or load the "
                "run folder's checkpoint to train."
            )
        if features is None or rna is None:
            raise ValueError(
                "MirrorModel.forward needs both modalities (the pairwise losses); use "
                "encode_slide() or encode_rna() for a single modality."
            )
        rna = check_rna(rna, cfg.n_genes, self._param_device())
        want_tokens = self.slide_retention is not None
        slide = self._encode(features, tile_mask, return_tokens=want_tokens, positions=positions)
        if slide.embedding.shape[0] != rna.shape[0]:
            from ..errors import ConfigError

            raise ConfigError(
                f"features hold {slide.embedding.shape[0]} slides but rna holds {rna.shape[0]} "
                "samples; the batch rows must be paired."
            )
        rna_in = rna.to(self._param_dtype()) if not torch.is_autocast_enabled() else rna
        rna_emb = self.rna_encoder(rna_in)
        slide_emb = slide.embedding
        out = MirrorOutput.start(rna_emb, slide_emb, slide.attention)
        losses = out.losses

        if self.slide_head is not None:
            out.slide_projection = self.project_slide(slide_emb)
            out.rna_projection = self.project_rna(rna_emb)
            out.logit_scale = self.current_logit_scale()
            losses["align"] = clip_loss(out.slide_projection, out.rna_projection, out.logit_scale)

        if self.slide_retention is not None:
            assert slide.tokens is not None
            ret = self.slide_retention(
                slide_emb, slide.tokens, slide.bag.lengths, slide.bag.uniform,
                stop_gradient=cfg.retention_stop_gradient,
                generator=generator,
            )  # fmt: skip
            losses["ret_slide"] = ret.loss()
            out.slide_retention_mask = to_input_order(ret.mask, slide.bag, fill=False)

        self._rna_retention_term(out, generator)

        if self.style is not None:
            out.slide_style = self.style(slide_emb)
            out.rna_style = self.style(rna_emb)
            if cfg.weight_style > 0:
                losses["style"] = gaussian_kl(
                    out.slide_style.mu, out.slide_style.logvar
                ) + gaussian_kl(out.rna_style.mu, out.rna_style.logvar)
            if cfg.weight_cluster > 0:
                losses["cluster"] = symmetric_kl(out.slide_style.scores, out.rna_style.scores)

        out.add_weighted_terms(cfg.loss_weights)
        return out

    #: The loss terms an expression-only cohort can train (no slide: no alignment, no slide
    #: retention, no cross-modal cluster agreement).
    RNA_ONLY_LOSSES: tuple[str, ...] = ("ret_rna", "style")

    def rna_only_losses(self) -> list[str]:
        """The active terms of this model that :meth:`forward_rna` computes."""
        cfg = self.config
        return [n for n in self.RNA_ONLY_LOSSES if cfg.loss_weights.get(n, 0.0) > 0]

    def forward_rna(self, rna: Tensor, generator: torch.Generator | None = None) -> MirrorOutput:
        """Pretraining forward pass without slides (expression-only cohorts).

        Computes the terms that need no slide: RNA retention (``ret_rna``, masked latent
        reconstruction of the RNA embedding) and the RNA half of the style prior (``style``,
        KL of the RNA style latent to N(0, I)). ``align``, ``ret_slide`` and ``cluster`` pair
        or use slides and are absent. Raises ConfigError when the model has none of the two.
        """
        from ..errors import ConfigError

        cfg = self.config
        active = self.rna_only_losses()
        if not active:
            raise ConfigError(
                "this model has no loss that works without slides (it needs weight_ret_rna > 0 "
                "or weight_style > 0); use the mirror or mirror-no-clustering preset for an "
                "expression-only cohort."
            )
        rna_emb = self.encode_rna(rna)
        out = MirrorOutput.start(rna_emb)
        losses = out.losses
        if "ret_rna" in active:
            self._rna_retention_term(out, generator)
        if "style" in active and self.style is not None:
            out.rna_style = self.style(rna_emb)
            losses["style"] = gaussian_kl(out.rna_style.mu, out.rna_style.logvar)
        out.add_weighted_terms(cfg.loss_weights)
        return out

    # ------------------------------------------------------------------ helpers
    def _encode(
        self,
        features: Tensor,
        tile_mask: Tensor | None,
        return_tokens: bool = False,
        positions: Tensor | None = None,
    ) -> Any:
        if self.needs_positions:
            return self.slide_encoder(features, tile_mask, return_tokens, positions=positions)
        return self.slide_encoder(features, tile_mask, return_tokens)
    def _rna_retention_term(self, out: MirrorOutput, generator: torch.Generator | None) -> None:
        """Add ``ret_rna`` (masked latent reconstruction of the RNA embedding) to ``out``."""
        if self.rna_retention is None:
            return
        ret = self.rna_retention(
            out.rna_embedding,
            stop_gradient=self.config.retention_stop_gradient,
            generator=generator,
        )
        out.losses["ret_rna"] = ret.loss()
        out.rna_retention_mask = ret.mask

    def _project(self, embedding: Tensor, head: nn.Linear | None) -> Tensor:
        if head is None:
            raise RuntimeError("this model has no alignment heads (weight_align = 0)")
        normed = F.normalize(
            embedding, dim=-1, eps=1e-12 if embedding.dtype == torch.float32 else 1e-6
        )
        projected = head(normed)
        if self.config.align_normalize_after_head:
            projected = F.normalize(projected, dim=-1)
        return projected

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _param_device(self) -> torch.device:
        return next(self.parameters()).device

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load weights after remapping renamed keys (:func:`checkpoint_filter_fn`)."""
        from . import checkpoint_filter_fn

        return super().load_state_dict(
            checkpoint_filter_fn(state_dict, self), strict=strict, assign=assign
        )
