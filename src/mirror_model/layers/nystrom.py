"""Nyström self-attention (Xiong et al. 2021) in O(N) memory, with padding masks.

The layer follows the ``nystrom-attention`` package that TransMIL and the MIRROR authors use
(8 heads, landmarks = segment means of queries/keys, Moore–Penrose iterations, a depthwise
convolution over the values as extra residual) with these deliberate differences, none of which
changes the result for an unpadded sequence except where stated:

* **No N×N matrix, ever.** ``softmax(Q K̃ᵀ) · (Ã⁺ · softmax(Q̃ Kᵀ) V)`` is evaluated right to left
  with :func:`torch.nn.functional.scaled_dot_product_attention` (two fused calls, N×m at most),
  instead of forming ``softmax(Q K̃ᵀ) Ã⁺`` (N×m·m) first. Same value, fewer FLOPs.
* **Padding is masked, not zero-filled.** The sequence is padded (conceptually, at the front, as in
  the reference) to a multiple of the landmark count; padding positions never act as keys and
  landmarks made only of padding are removed exactly (their rows/columns of the m×m kernel are
  replaced by the identity, which keeps the pseudo-inverse block-diagonal). A batched call with
  ``lengths`` therefore gives, per sample, the same result as an unbatched call on the valid prefix.
  (The reference lets zero padding tokens take part in the softmax.)
* **Per-matrix scaling of the pseudo-inverse start point** (the reference uses one global maximum
  over the whole batch, which couples the samples of a batch). The pseudo-inverse is always
  computed in float32, also under bf16 autocast: iterated in bf16 it nearly doubles the worst
  bf16 error of a trained model's slide embedding (demo cohort, 36 slides, Nyström path,
  relative L2 vs fp32: median 0.61 % / max 0.88 % with the fp32 pseudo-inverse, 0.72 % / 1.55 %
  with a bf16 one), for ≈ 12 % of the FLOPs of a 20,000-tile slide.
* **Exact attention where it is cheaper** (``mode="auto"``, the default). Nyström pays a fixed
  ``8·h·iters·m³`` FLOPs for the pseudo-inverse of the m×m landmark kernels (21.7 GFLOP per
  layer and sample at D = 768, m = 384, 6 iterations) plus ``8·n·m·D`` for its two attention
  products; exact softmax attention costs ``4·n²·D``. Below the crossover
  (:func:`exact_attention_max_tokens`: 3,099 tokens at the authors' size, so their 2,048-tile
  bags) a sample gets exact fused attention (``scaled_dot_product_attention``, still O(n)
  memory), above it Nyström. For n ≤ m every landmark is a single token and Nyström converges
  to exactly this value; for m < n ≤ crossover it is the value Nyström approximates. The
  choice is made per sample, on its own valid length, so a sample inside a padded batch
  still equals the sample alone.
* ``mode="short"``: exact attention only where it is what Nyström converges to (n ≤ m),
  Nyström above — the rule of models saved before ``"auto"`` existed, kept so that they
  compute what they were evaluated with. ``mode="nystrom"``: always Nyström (masked padding,
  as above). ``mode="reference"``: the authors' behaviour — always Nyström, the sequence zero-padded at the front to a multiple of
  m, the padding tokens taking part in every softmax and in the landmark means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTION_MODES",
    "NystromAttention",
    "NystromLayer",
    "NystromResult",
    "exact_attention_max_tokens",
    "gather_rows",
    "moore_penrose_pinv",
]

#: ``mode`` of :class:`NystromAttention` (``ModelConfig.slide_attention``).
ATTENTION_MODES: tuple[str, ...] = ("auto", "short", "nystrom", "reference")


def exact_attention_max_tokens(dim: int, heads: int, landmarks: int, pinv_iterations: int) -> int:
    """Longest sequence for which exact softmax attention needs no more FLOPs than Nyström.

    Forward FLOPs per sample beyond what both share (projections, value convolution):
    exact ``4·n²·D`` (Q·Kᵀ and P·V); Nyström ``8·h·iters·m³`` (pseudo-inverse: 4 products of
    m×m per iteration and head) ``+ 4·m²·D`` (landmark kernel, Ã⁺·(…)) ``+ 8·n·m·D`` (the two
    n×m attention products). Returns the largest n with exact <= Nyström (at least m); the
    backward pass roughly doubles both sides alike.
    """
    m, d = int(landmarks), int(dim)
    a = 4.0 * d
    b = -8.0 * m * d
    c = -(8.0 * heads * pinv_iterations * m**3 + 4.0 * m * m * d)
    n = int(math.floor((-b + math.sqrt(b * b - 4.0 * a * c)) / (2.0 * a)))
    return max(n, m)


def _at_least_f32(t: Tensor) -> Tensor:
    """float32 for bf16/fp16/fp32 input, float64 kept (tests compare in float64)."""
    return t if t.dtype == torch.float64 else t.float()


def moore_penrose_pinv(x: Tensor, iterations: int = 6, per_matrix: bool = True) -> Tensor:
    """Iterative Moore–Penrose pseudo-inverse of square matrices ``x [..., m, m]``.

    The cubic iteration of Razavi et al. (2014), as used by Nyströmformer:
    ``Z ← ¼ Z (13 I − XZ (15 I − XZ (7 I − XZ)))``, started at ``Z₀ = Xᵀ / (‖X‖₁ ‖X‖∞)``
    computed per matrix (``per_matrix=False``: the maxima over the whole batch, as the
    reference, which couples the samples of a batch). Always runs in at least float32 (bf16 is
    too coarse for it) and returns float32 (float64 for float64 input).
    """
    device_type = x.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        x = _at_least_f32(x)
        abs_x = x.abs()
        norm_1 = abs_x.sum(dim=-2).amax(dim=-1)  # max column sum
        norm_inf = abs_x.sum(dim=-1).amax(dim=-1)  # max row sum
        if per_matrix:
            z = x.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
        else:
            z = x.transpose(-1, -2) / (norm_1.max() * norm_inf.max())
        shape, m = x.shape, x.shape[-1]
        eye = torch.eye(m, dtype=x.dtype, device=x.device)
        # cI − XZ·T as one fused product-and-add (baddbmm broadcasts the m×m cI): no negation pass
        n_mat = x[..., 0, 0].numel()
        eye15, eye13 = (eye * 15.0).expand(n_mat, m, m), (eye * 13.0).expand(n_mat, m, m)
        for _ in range(iterations):
            xz = x @ z
            xz3 = xz.reshape(-1, m, m)
            t = _minus_plus_diag(xz, 7.0)  # 7I - XZ
            t = torch.baddbmm(eye15, xz3, t.reshape(-1, m, m), alpha=-1.0)  # 15I - XZ(7I - XZ)
            t = torch.baddbmm(eye13, xz3, t, alpha=-1.0).reshape(shape)  # 13I - XZ(...)
            z = (z @ t).mul_(0.25)
    return z


def _key_valid(length: int, lengths: Tensor | None, device: torch.device) -> Tensor | None:
    """``[B, L]`` bool: position < the sample's valid length (None when all are valid)."""
    if lengths is None:
        return None
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, L, D]`` at positions ``index [B, M]`` -> ``[B, M, D]``."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def _select(res: NystromResult, query_index: Tensor | None) -> NystromResult:
    """``res`` with its output rows taken at ``query_index`` (all rows when None)."""
    if query_index is None:
        return res
    return NystromResult(out=gather_rows(res.out, query_index), cls_attention=res.cls_attention)


def _minus_plus_diag(a: Tensor, c: float) -> Tensor:
    """``c·I − a`` without materialising the identity (the negation is a fresh tensor)."""
    out = a.neg()
    out.diagonal(dim1=-2, dim2=-1).add_(c)
    return out


@dataclass
class NystromResult:
    """Output of :class:`NystromAttention`.

    Attributes
    ----------
    out
        ``[B, L, D]`` attention output (values at padding positions are finite but meaningless).
    cls_attention
        ``[B, L]`` exact softmax attention of the query at position 0 over the keys selected by
        ``cls_key_mask``, averaged over heads (zeros elsewhere), or ``None`` when not requested.
    """

    out: Tensor
    cls_attention: Tensor | None = None


class NystromAttention(nn.Module):
    """Multi-head Nyström attention over a (possibly padded) token sequence.

    Parameters
    ----------
    dim
        Token width D (divisible by ``heads``).
    heads
        Number of heads; head width is ``dim // heads``.
    landmarks
        Number m of landmarks (segment means); for sequences shorter than m every landmark is a
        single token and the approximation becomes exact up to the pseudo-inverse iterations.
    pinv_iterations
        Moore–Penrose iterations.
    conv_kernel
        Kernel length of the depthwise value convolution along the sequence (0 = off).
    dropout
        Dropout on the output projection.
    mode
        ``"auto"`` (exact attention for samples of at most :attr:`exact_max_tokens` valid
        tokens, where it is cheaper, Nyström above), ``"short"`` (exact only up to ``landmarks``
        tokens), ``"nystrom"`` (always Nyström) or ``"reference"`` (always Nyström with the
        authors' zero padding); see the module docstring.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        conv_kernel: int = 33,
        dropout: float = 0.0,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if mode not in ATTENTION_MODES:
            raise ValueError(f"mode={mode!r} must be one of {ATTENTION_MODES}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.landmarks = int(landmarks)
        self.pinv_iterations = int(pinv_iterations)
        self.scale = self.head_dim**-0.5
        self.mode = mode
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        if conv_kernel:
            # Conv2d over [B, heads, L, head_dim] with a (k, 1) kernel: a per-head filter along
            # the sequence, shared across the head's features (same layout as the reference).
            self.res_conv: nn.Conv2d | None = nn.Conv2d(
                heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads,
                bias=False,
            )  # fmt: skip
        else:
            self.res_conv = None

    @property
    def exact_max_tokens(self) -> int:
        """Samples with at most this many valid tokens get exact attention (0 = never)."""
        if self.mode == "auto":
            return exact_attention_max_tokens(
                self.dim, self.heads, self.landmarks, self.pinv_iterations
            )
        return self.landmarks if self.mode == "short" else 0

    # ------------------------------------------------------------------ landmarks
    def _landmarks_dense(self, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Segment means for an unpadded batch ``t [B, h, L, d]``; front padding as the reference."""
        bsz, h, length, d = t.shape
        m = self.landmarks
        seg = math.ceil(length / m)
        pad = m * seg - length
        # Conceptually pad `pad` zeros at the front; compute the segment sums without copying:
        # `empty` all-padding segments, then one partial segment, then full segments.
        empty, partial = divmod(pad, seg)
        head = (seg - partial) % seg  # valid tokens in the partial segment (0 if none)
        parts = []
        if empty:
            parts.append(t.new_zeros(bsz, h, empty, d))
        if head:
            parts.append(t[:, :, :head].sum(dim=2, keepdim=True))
        n_full = m - empty - (1 if head else 0)
        parts.append(t[:, :, head:].reshape(bsz, h, n_full, seg, d).sum(dim=3))
        sums = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        idx = torch.arange(m, device=t.device)
        counts = ((idx + 1) * seg - torch.clamp(idx * seg, min=pad)).clamp(min=0)
        valid = counts > 0
        means = sums / counts.clamp(min=1).to(sums.dtype)[:, None]
        if bool(valid.all()):
            return means, None
        return means, valid.unsqueeze(0).expand(bsz, m)

    def _landmarks_masked(self, t: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Segment means per sample for ``t [B, h, L, d]`` whose valid tokens are ``[:lengths[b]]``.

        Segment boundaries are those the sample would get alone (front padding to a multiple of
        m); sums come from a float32 prefix sum so the cost stays O(L).
        """
        b, h, _, d = t.shape
        m = self.landmarks
        n = lengths.to(torch.long)
        seg = torch.div(n + m - 1, m, rounding_mode="floor")  # ceil(n / m), >= 1
        pad = m * seg - n
        idx = torch.arange(m, device=t.device)
        start = (idx[None] * seg[:, None] - pad[:, None]).clamp(0)  # [B, m], position in [0, n]
        start = torch.minimum(start, n[:, None])
        end = ((idx[None] + 1) * seg[:, None] - pad[:, None]).clamp(0)
        end = torch.minimum(end, n[:, None])
        counts = end - start
        with torch.autocast(device_type=t.device.type, enabled=False):
            csum = F.pad(_at_least_f32(t).cumsum(dim=2), (0, 0, 1, 0))  # [B, h, L+1, d]
            gi_end = end[:, None, :, None].expand(b, h, m, d)
            gi_start = start[:, None, :, None].expand(b, h, m, d)
            sums = csum.gather(2, gi_end) - csum.gather(2, gi_start)
            means = sums / counts.clamp(min=1)[:, None, :, None].to(sums.dtype)
        return means.to(t.dtype), counts > 0

    def _landmarks(self, t: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Segment means of ``t [B, h, L, d]`` and the ``[B, m]`` landmark validity (None = all valid)."""
        if lengths is None:
            return self._landmarks_dense(t)
        means, valid = self._landmarks_masked(t, lengths)
        return means, None if bool(valid.all()) else valid

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        lengths: Tensor | None = None,
        cls_key_mask: Tensor | None = None,
        cls_only: bool = False,
        query_index: Tensor | None = None,
    ) -> NystromResult:
        """Attend ``x [B, L, D]``.

        Parameters
        ----------
        x
            Token sequence; for sample b the valid tokens are ``x[b, :lengths[b]]``.
        lengths
            ``[B]`` number of valid tokens per sample (>= 1), or ``None`` when all are valid.
        cls_key_mask
            ``[B, L]`` bool; when given, also return the exact softmax attention row of the query
            at position 0 over these keys (the row Nyström approximates), averaged over heads.
        cls_only
            Compute the output at position 0 only (``out`` is ``[B, 1, D]``), for a last layer whose
            other outputs are unused. Same values as ``forward(x).out[:, :1]`` up to rounding, with
            neither the queries of all tokens, the N×m output attention nor the output projection
            of all tokens (the query landmarks are the projected segment means of ``x``, which is
            the same by linearity).
        query_index
            ``[B, M]`` positions (long): compute the output at these positions only (``out`` is
            ``[B, M, D]``, row j of sample b = position ``query_index[b, j]``), for a last layer
            of which only some outputs are used (the slide retention decoder's masked tiles).
            Same values as ``forward(x).out`` gathered at ``query_index`` up to rounding. The
            exact path computes only these queries, their attention rows and output
            projections; the Nyström paths compute all positions and select. Not with
            ``cls_only``.
        """
        if cls_only and query_index is not None:
            raise ValueError("cls_only and query_index are exclusive (cls_only = position 0)")
        length = x.shape[1]
        if lengths is not None and bool((lengths >= length).all()):
            lengths = None
        if self.mode == "reference":
            return _select(self._forward_reference(x, lengths, cls_key_mask, cls_only), query_index)
        limit = self.exact_max_tokens  # per sample: exact attention where it is cheaper
        if limit:
            short = None if lengths is None else lengths <= limit
            if (length <= limit) if short is None else bool(short.all()):
                return self._forward_exact(x, lengths, cls_key_mask, cls_only, query_index)
            if short is not None and bool(short.any()):
                return self._forward_split(x, lengths, cls_key_mask, cls_only, short, query_index)
        if cls_only:
            return self._forward_cls(x, lengths, cls_key_mask)
        return _select(self._forward_nystrom(x, lengths, cls_key_mask), query_index)

    def _forward_nystrom(
        self, x: Tensor, lengths: Tensor | None, cls_key_mask: Tensor | None, cls_pos: int = 0
    ) -> NystromResult:
        """Nyström attention over all positions (the query at ``cls_pos`` gives the CLS row)."""
        bsz, length, _ = x.shape
        h, d = self.heads, self.head_dim
        qkv = self.to_qkv(x).reshape(bsz, length, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, L, d]
        # The softmax scale 1/sqrt(d) multiplies every logit (q·k, q̃·k, q̃·k̃ alike) and the
        # landmarks are linear in q, so it is applied to the logits instead of to q (no copy).
        scale = self.scale

        key_valid = _key_valid(length, lengths, x.device)
        q_l, lm_valid = self._landmarks(q, lengths)
        k_l, _ = self._landmarks(k, lengths)

        key_mask = None if key_valid is None else key_valid[:, None, None, :]
        lm_mask = None if lm_valid is None else lm_valid[:, None, None, :]
        mixed = self._mixed_values(q_l, k_l, k, v, lm_valid, key_mask)
        # softmax(Q K̃ᵀ) · mixed : [B, h, L, d]
        out = F.scaled_dot_product_attention(
            q, k_l.to(q.dtype), mixed.to(q.dtype), attn_mask=lm_mask, scale=scale
        )

        conv = self._value_conv(v, key_valid, cls_only=False)
        if conv is not None:
            # in place when no gradient is needed (inference): one [B, h, L, d] buffer less
            out = out + conv if out.requires_grad else out.add_(conv)

        out = out.transpose(1, 2).reshape(bsz, length, h * d)
        out = self.dropout(self.to_out(out))
        q_cls = q[:, :, cls_pos : cls_pos + 1]
        return NystromResult(out=out, cls_attention=self._cls_attention(q_cls, k, cls_key_mask))

    def _forward_reference(
        self, x: Tensor, lengths: Tensor | None, cls_key_mask: Tensor | None, cls_only: bool
    ) -> NystromResult:
        """The authors' Nyström: zero-pad at the front to a multiple of m, padding tokens
        included in every softmax and landmark mean; outputs of the padding dropped. A padded
        batch runs sample by sample on each valid prefix (the reference has no masks)."""
        bsz, length, _ = x.shape
        if lengths is not None:
            return self._per_sample(x, lengths, cls_key_mask, cls_only, self._forward_reference)
        pad = (-length) % self.landmarks
        xp = F.pad(x, (0, 0, pad, 0))  # zero tokens -> zero q, k, v (to_qkv has no bias)
        mask_p = None if cls_key_mask is None else F.pad(cls_key_mask, (pad, 0), value=False)
        res = self._forward_nystrom(xp, None, mask_p, cls_pos=pad)
        out = res.out[:, pad : pad + 1] if cls_only else res.out[:, pad:]
        att = None if res.cls_attention is None else res.cls_attention[:, pad:]
        return NystromResult(out=out, cls_attention=att)

    def _per_sample(self, x, lengths, cls_key_mask, cls_only, fn) -> NystromResult:
        """Run ``fn`` on each sample's valid prefix; outputs zero-padded back to the batch length."""
        length = x.shape[1]
        outs, atts = [], []
        for b in range(x.shape[0]):
            n = int(lengths[b])
            mask_b = None if cls_key_mask is None else cls_key_mask[b : b + 1, :n]
            res = fn(x[b : b + 1, :n], None, mask_b, cls_only)
            n_out = res.out.shape[1]
            outs.append(F.pad(res.out, (0, 0, 0, (1 if cls_only else length) - n_out)))
            if res.cls_attention is not None:
                atts.append(F.pad(res.cls_attention, (0, length - n)))
        return NystromResult(out=torch.cat(outs), cls_attention=torch.cat(atts) if atts else None)

    def _queries(self, t: Tensor) -> Tensor:
        """Queries ``[B, h, n, d]`` of the (normed) tokens ``t [B, n, D]``."""
        bsz, n, _ = t.shape
        q = F.linear(t, self.to_qkv.weight[: self.dim])
        return q.reshape(bsz, n, self.heads, self.head_dim).transpose(1, 2)

    def _keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, h, L, d]`` of ``x [B, L, D]`` (without computing the queries)."""
        bsz, length, _ = x.shape
        kv = F.linear(x, self.to_qkv.weight[self.dim :])
        k, v = kv.reshape(bsz, length, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def _value_conv(self, v: Tensor, key_valid: Tensor | None, cls_only: bool) -> Tensor | None:
        """The depthwise value convolution (residual) over the valid values, ``[B, h, L, d]``, or
        only its position 0 (``[B, h, 1, d]``) when ``cls_only``; None when it is off."""
        if self.res_conv is None:
            return None
        if cls_only:  # position 0 of the sequence convolution sees only the first k//2 + 1 values
            v = v[:, :, : self.res_conv.kernel_size[0] // 2 + 1]
        if key_valid is not None:
            v = v * key_valid[:, None, : v.shape[2], None].to(v.dtype)
        if cls_only:
            return self.res_conv(v)[:, :, :1]
        # channels_last is the fastest layout for this depthwise conv on CPU (measured)
        return self.res_conv(v.contiguous(memory_format=torch.channels_last))

    def _forward_exact(
        self,
        x: Tensor,
        lengths: Tensor | None,
        cls_key_mask: Tensor | None,
        cls_only: bool,
        query_index: Tensor | None = None,
    ) -> NystromResult:
        """Exact softmax attention (samples of at most :attr:`exact_max_tokens` valid tokens),
        for the queries at ``query_index`` (position 0 if ``cls_only``, else all)."""
        bsz, length, _ = x.shape
        key_valid = _key_valid(length, lengths, x.device)
        key_mask = None if key_valid is None else key_valid[:, None, None, :]
        k, v = self._keys_values(x)
        if query_index is not None:
            q = self._queries(gather_rows(x, query_index))
        else:
            q = self._queries(x[:, :1] if cls_only else x)
        n_q = q.shape[2]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=self.scale)
        conv = self._value_conv(v, key_valid, cls_only)
        if conv is not None:
            if query_index is not None:
                idx = query_index[:, None, :, None].expand(bsz, self.heads, n_q, self.head_dim)
                conv = conv.gather(2, idx)
            out = out + conv
        out = self.dropout(self.to_out(out.transpose(1, 2).reshape(bsz, n_q, self.dim)))
        if query_index is None or cls_key_mask is None:
            q_cls = q[:, :, :1]  # unused without cls_key_mask
        else:
            q_cls = self._queries(x[:, :1])
        return NystromResult(out=out, cls_attention=self._cls_attention(q_cls, k, cls_key_mask))

    def _forward_split(
        self,
        x: Tensor,
        lengths: Tensor | None,
        cls_key_mask: Tensor | None,
        cls_only: bool,
        short: Tensor,
        query_index: Tensor | None = None,
    ) -> NystromResult:
        """A batch mixing short and long samples: each group on its own path, then reassembled."""
        assert lengths is not None  # samples of one length are all short or all long
        parts = []
        for sel in (short, ~short):
            idx = sel.nonzero().squeeze(1)
            res = self.forward(
                x[idx],
                lengths=lengths[idx],
                cls_key_mask=None if cls_key_mask is None else cls_key_mask[idx],
                cls_only=cls_only,
                query_index=None if query_index is None else query_index[idx],
            )
            parts.append((idx, res))
        first = parts[0][1]
        out = first.out.new_empty((x.shape[0], *first.out.shape[1:]))
        att = None
        if first.cls_attention is not None:
            att = first.cls_attention.new_empty((x.shape[0], *first.cls_attention.shape[1:]))
        for idx, res in parts:
            out = out.index_copy(0, idx, res.out)
            if att is not None:
                assert res.cls_attention is not None
                att = att.index_copy(0, idx, res.cls_attention)
        return NystromResult(out=out, cls_attention=att)

    def _mixed_values(
        self,
        q_l: Tensor,
        k_l: Tensor,
        k: Tensor,
        v: Tensor,
        lm_valid: Tensor | None,
        key_mask: Tensor | None,
    ) -> Tensor:
        """``Ã⁺ · softmax(Q̃ Kᵀ) V`` ``[B, h, m, d]``; the m×m kernel and its pseudo-inverse in float32.

        Landmarks made of padding only become identity rows/columns of the kernel so they drop
        out exactly (see module docstring).
        """
        scale = self.scale
        with torch.autocast(device_type=k.device.type, enabled=False):
            sim2 = (_at_least_f32(q_l) * scale) @ _at_least_f32(k_l).transpose(-1, -2)
            if lm_valid is not None:
                sim2 = sim2.masked_fill(~lm_valid[:, None, None, :], float("-inf"))
            kernel = sim2.softmax(dim=-1)
            if lm_valid is not None:
                eye = torch.eye(self.landmarks, device=k.device, dtype=kernel.dtype)
                kernel = torch.where(lm_valid[:, None, :, None], kernel, eye)
            kernel_pinv = moore_penrose_pinv(
                kernel, self.pinv_iterations, per_matrix=self.mode != "reference"
            )
        # softmax(Q̃ Kᵀ) V : [B, h, m, d]
        landmark_values = F.scaled_dot_product_attention(
            q_l.to(k.dtype), k, v, attn_mask=key_mask, scale=scale
        )
        return kernel_pinv.to(landmark_values.dtype) @ landmark_values

    def _cls_attention(
        self, q_cls: Tensor, k: Tensor, cls_key_mask: Tensor | None
    ) -> Tensor | None:
        """Exact head-averaged ``softmax(q_cls · Kᵀ/√d)`` over ``cls_key_mask`` ``[B, L]`` (or None)."""
        if cls_key_mask is None:
            return None
        with torch.autocast(device_type=k.device.type, enabled=False):
            logits = (
                (_at_least_f32(q_cls) * self.scale) @ _at_least_f32(k).transpose(-1, -2)
            ).squeeze(2)
            logits = logits.masked_fill(~cls_key_mask[:, None, :], float("-inf"))
            return logits.softmax(dim=-1).mean(dim=1)

    def _forward_cls(
        self, x: Tensor, lengths: Tensor | None, cls_key_mask: Tensor | None
    ) -> NystromResult:
        """Output at position 0 only; see ``cls_only`` in :meth:`forward`."""
        bsz, length, _ = x.shape
        k, v = self._keys_values(x)
        q_cls = self._queries(x[:, :1])  # [B, h, 1, d]
        # query landmarks = W_q · (segment means of x), by linearity of the projection
        key_valid = _key_valid(length, lengths, x.device)
        x_l, lm_valid = self._landmarks(x.unsqueeze(1), lengths)
        k_l, _ = self._landmarks(k, lengths)
        q_l = self._queries(x_l.squeeze(1))  # [B, h, m, d]
        key_mask = None if key_valid is None else key_valid[:, None, None, :]
        lm_mask = None if lm_valid is None else lm_valid[:, None, None, :]
        mixed = self._mixed_values(q_l, k_l, k, v, lm_valid, key_mask)
        out = F.scaled_dot_product_attention(
            q_cls, k_l.to(q_cls.dtype), mixed.to(q_cls.dtype), attn_mask=lm_mask, scale=self.scale
        )  # [B, h, 1, d]
        conv = self._value_conv(v, key_valid, cls_only=True)
        if conv is not None:
            out = out + conv
        out = self.dropout(self.to_out(out.transpose(1, 2).reshape(bsz, 1, self.dim)))
        return NystromResult(out=out, cls_attention=self._cls_attention(q_cls, k, cls_key_mask))


class NystromLayer(nn.Module):
    """Pre-norm residual Nyström attention layer, no feed-forward (TransMIL ``TransLayer``).

    ``dim`` and the keyword arguments are those of :class:`NystromAttention` (``heads``,
    ``landmarks``, ``pinv_iterations``, ``conv_kernel``, ``mode``); only the default dropout
    differs (0.1, as TransMIL's layer).
    """

    def __init__(self, dim: int, *, dropout: float = 0.1, **attention: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, dropout=dropout, **attention)

    def forward(self, x: Tensor, **options: Any) -> NystromResult:
        """``x + attn(norm(x))`` at the positions the attention computes: all, position 0 only
        (``[B, 1, D]``) with ``cls_only=True``, the positions ``query_index [B, M]`` only
        (``[B, M, D]``) when given. ``options`` (``lengths``, ``cls_key_mask``, ``cls_only``,
        ``query_index``) are those of :meth:`NystromAttention.forward`."""
        res = self.attn(self.norm(x), **options)
        query_index = options.get("query_index")
        if options.get("cls_only"):
            base = x[:, :1]
        else:
            base = x if query_index is None else gather_rows(x, query_index)
        return NystromResult(out=base + res.out, cls_attention=res.cls_attention)
