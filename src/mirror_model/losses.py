"""Loss terms of MIRROR (design §1.4–§1.6). All are computed in float32 (float64 inputs stay float64).

* :func:`clip_loss` — symmetric InfoNCE with negatives gathered from every rank under
  ``torch.distributed``;
* :func:`retention_loss` — MSE over masked positions only;
* :func:`gaussian_kl` — KL(N(μ, σ²) ‖ N(0, I)), the style loss of one modality;
* :func:`symmetric_kl` — the cluster loss between two prototype posteriors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clip_loss", "gaussian_kl", "retention_loss", "symmetric_kl"]


# torch >= 2.13 names the single-tensor collectives *_single (the *_tensor names warn FutureWarning)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _f32(t: Tensor) -> Tensor:
    """float32 for half-precision/float32 input; float64 is kept (exact comparisons in tests)."""
    return t if t.dtype == torch.float64 else t.float()


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllGatherRows(torch.autograd.Function):
    """``all_gather_single`` over the default group, with the gradient of a gather.

    Forward: ``[n, ...]`` on every rank -> ``[world * n, ...]`` (rank order). Backward: each
    rank receives the *sum over ranks* of the gradient for its own rows (``reduce_scatter``),
    because every rank's loss uses every row. The group is looked up at call time and never
    stored, so nothing here keeps a process group alive after ``destroy_process_group``
    (``torch.distributed.nn.functional`` captures the WORLD group in default arguments when
    imported after ``init_process_group``, which kept gloo's threads running into interpreter
    shutdown).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        _reduce_scatter_single(out, grad)
        return out


def _gather_with_grad(x: Tensor) -> tuple[Tensor, int, int]:
    """All-gather ``x [n_local, D]`` from every rank with autograd (sizes may differ).

    Returns the concatenated ``[N_global, D]`` tensor, this rank's row offset and N_global.
    The backward sums the gradients that every rank computes for this rank's rows, which is
    what makes the gathered loss exact.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = torch.empty(world, device=x.device, dtype=torch.long)
    _all_gather_single(sizes, n_local)
    sizes_list = [int(s) for s in sizes.tolist()]
    n_max = max(sizes_list)
    if x.shape[0] < n_max:  # the collective needs equal shapes: pad, gather, cut
        x = torch.cat([x, x.new_zeros(n_max - x.shape[0], *x.shape[1:])], dim=0)
    parts = _AllGatherRows.apply(x).split(n_max)
    gathered = torch.cat([p[:s] for p, s in zip(parts, sizes_list, strict=True)], dim=0)
    return gathered, sum(sizes_list[:rank]), sum(sizes_list)


def clip_loss(
    emb_a: Tensor, emb_b: Tensor, logit_scale: Tensor | float, gather: bool = True
) -> Tensor:
    """Symmetric InfoNCE (CLIP) loss between paired rows of ``emb_a`` and ``emb_b``.

    ``logits = s · A Bᵀ``; loss ``= ½ [CE(logits, diag) + CE(logitsᵀ, diag)]``, each cross-entropy
    averaged over rows. The embeddings are used as given (the MIRROR heads normalise *before* the
    projection, not after).

    Under ``torch.distributed`` (initialised, world size > 1) and ``gather=True``, the columns are
    the embeddings of *all* ranks (gathered with autograd) and each rank's rows are its local
    pairs. The returned value is this rank's share scaled by ``n_local · world / N_global``, so
    that (i) its average over ranks equals the single-process loss on the global batch, and (ii)
    DistributedDataParallel's gradient averaging yields exactly the single-process gradient on the
    global batch (also for unequal local batch sizes).

    Parameters
    ----------
    emb_a, emb_b
        ``[n, D]`` paired embeddings (row i of both belongs to the same patient).
    logit_scale
        s = exp(t), already clamped (scalar tensor or float).
    gather
        Gather negatives across ranks when running distributed.
    """
    a = _f32(emb_a)
    b = _f32(emb_b)
    scale = _f32(logit_scale) if isinstance(logit_scale, Tensor) else float(logit_scale)
    n_local = a.shape[0]
    if gather and _distributed_world() > 1:
        all_a, offset, n_global = _gather_with_grad(a)
        all_b, _, _ = _gather_with_grad(b)
        labels = torch.arange(n_local, device=a.device) + offset
        logits_ab = scale * a @ all_b.t()  # local rows vs all columns
        logits_ba = scale * b @ all_a.t()
        local = 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))
        return local * (n_local * _distributed_world() / n_global)
    labels = torch.arange(n_local, device=a.device)
    logits = scale * a @ b.t()
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def retention_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked positions only.

    Parameters
    ----------
    pred, target
        ``[B, N, D]`` tokens with ``mask [B, N]`` (the error is first averaged over D per token,
        then over the masked tokens of the whole batch), or ``[B, D]`` vectors with
        ``mask [B, D]`` (averaged over the masked coordinates of the whole batch).
    mask
        Bool, True = masked (a reconstruction target). Unmasked positions do not contribute.
    """
    err = (_f32(pred) - _f32(target)).square()
    if err.dim() == mask.dim() + 1:
        err = err.mean(dim=-1)
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp(min=1.0)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)), summed over latent dimensions, averaged over the batch.

    ``½ Σ_j (σ_j² + μ_j² − 1 − log σ_j²)`` with ``logvar = log σ²``; exactly 0 iff μ = 0, σ = 1.
    """
    mu = _f32(mu)
    logvar = _f32(logvar)
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(dim=-1).mean()


def symmetric_kl(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Symmetrised KL between the posteriors ``softmax(logits_a)`` and ``softmax(logits_b)``.

    ``½ [KL(p_a ‖ p_b) + KL(p_b ‖ p_a)]`` per sample (the mean of both directions, as the
    authors), averaged over the batch; exactly 0 iff the posteriors agree, symmetric in a, b.
    """
    log_a = F.log_softmax(_f32(logits_a), dim=-1)
    log_b = F.log_softmax(_f32(logits_b), dim=-1)
    p_a, p_b = log_a.exp(), log_b.exp()
    kl_ab = (p_a * (log_a - log_b)).sum(dim=-1)
    kl_ba = (p_b * (log_b - log_a)).sum(dim=-1)
    return 0.5 * (kl_ab + kl_ba).mean()
