"""Shared layers: Nyström attention (vs exact softmax attention), masking, PPEG, RNA block."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mirror_model.layers import (
    PPEG,
    ChunkAttention,
    NystromAttention,
    NystromLayer,
    moore_penrose_pinv,
    sinusoidal_positions,
)
from mirror_model.layers.nystrom import exact_attention_max_tokens


def _exact_attention(layer: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: full softmax attention with the layer's own weights (+ its value conv)."""
    b, n, _ = x.shape
    h, d = layer.heads, layer.head_dim
    q, k, v = layer.to_qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) * layer.scale, dim=-1)
    out = attn @ v
    if layer.res_conv is not None:
        out = out + layer.res_conv(v)
    return layer.to_out(out.transpose(1, 2).reshape(b, n, h * d))


def _authors_nystrom(layer: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    """The authors' Nyström attention written out (the ``nystrom-attention`` package as TransMIL
    calls it: no mask): zero-pad at the front to a multiple of m, landmarks = segment sums / seg
    (padding included), three softmaxes over all (padded) positions, the pseudo-inverse started
    from the batch-wide maxima, ``(A1 · A2⁺) · (A3 · V)`` + value conv, padding rows dropped."""
    b, n, _ = x.shape
    h, d, m = layer.heads, layer.head_dim, layer.landmarks
    pad = (-n) % m
    xp = F.pad(x, (0, 0, pad, 0))
    q, k, v = layer.to_qkv(xp).reshape(b, n + pad, 3, h, d).permute(2, 0, 3, 1, 4)
    q = q * layer.scale
    seg = (n + pad) // m
    q_l = q.reshape(b, h, m, seg, d).sum(dim=3) / seg
    k_l = k.reshape(b, h, m, seg, d).sum(dim=3) / seg
    a1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
    a2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
    a3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
    absx = a2.abs()
    z = a2.transpose(-1, -2) / (absx.sum(dim=-1).max() * absx.sum(dim=-2).max())
    eye = torch.eye(m, dtype=x.dtype)
    for _ in range(layer.pinv_iterations):
        xz = a2 @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    out = (a1 @ z) @ (a3 @ v)
    if layer.res_conv is not None:
        out = out + layer.res_conv(v)
    out = layer.to_out(out.transpose(1, 2).reshape(b, n + pad, h * d))
    return out[:, pad:]


def test_exact_limit_is_the_flop_crossover():
    """exact (4 n² D) <= Nyström (8 h it m³ + 4 m² D + 8 n m D) up to the limit, not after."""

    def exact(n, dim):
        return 4 * n * n * dim

    def nystrom(n, dim, heads, m, it):
        return 8 * heads * it * m**3 + 4 * m * m * dim + 8 * n * m * dim

    for dim, heads, m, it in [(768, 8, 384, 6), (96, 8, 48, 6), (8, 2, 6, 6), (16, 2, 8, 6)]:
        n = exact_attention_max_tokens(dim, heads, m, it)
        assert n >= m
        assert exact(n, dim) <= nystrom(n, dim, heads, m, it)
        assert exact(n + 1, dim) > nystrom(n + 1, dim, heads, m, it)
    # the authors' size: their 2,048-tile bags (2,117 tokens with CLS and square padding) are
    # below the crossover, whole slides (20,000 tiles) far above
    assert exact_attention_max_tokens(768, 8, 384, 6) == 3099
    modes = {mode: NystromAttention(768, 8, 384, mode=mode).exact_max_tokens
             for mode in ("auto", "short", "nystrom", "reference")}  # fmt: skip
    assert modes == {"auto": 3099, "short": 384, "nystrom": 0, "reference": 0}


@pytest.mark.parametrize(("n", "landmarks"), [(13, 4), (12, 4), (3, 8), (40, 7)])
def test_reference_mode_is_the_authors_nystrom(n, landmarks):
    torch.manual_seed(6)
    layer = NystromAttention(8, heads=2, landmarks=landmarks, conv_kernel=5, mode="reference")
    layer = layer.double().eval()
    x = torch.randn(2, n, 8, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x).out
        want = _authors_nystrom(layer, x)
        cls = layer(x, cls_only=True).out
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
    assert torch.allclose(cls, want[:, :1], atol=1e-10)
    if n % landmarks:  # zero padding takes part in the softmax: not the masked variant
        layer.mode = "nystrom"
        with torch.no_grad():
            assert not torch.allclose(layer(x).out, want, atol=1e-6)


def test_pinv_converges_to_the_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(3 * torch.randn(2, 6, 6, generator=g, dtype=torch.float64), dim=-1)
    a = a + torch.eye(6, dtype=torch.float64)  # well conditioned
    z = moore_penrose_pinv(a, iterations=30)
    assert torch.allclose(z, torch.linalg.inv(a), atol=1e-10)
    assert moore_penrose_pinv(a.float(), 6).dtype == torch.float32
    assert moore_penrose_pinv(a.bfloat16(), 6).dtype == torch.float32  # always >= fp32


def test_nystrom_equals_softmax_attention_when_every_landmark_is_one_token():
    # the iterated path (as the reference) converges to exact attention when L <= m ...
    torch.manual_seed(0)
    n, dim = 12, 16
    layer = NystromAttention(
        dim, heads=2, landmarks=n, pinv_iterations=40, conv_kernel=5, mode="nystrom"
    ).double()
    x = torch.randn(1, n, dim, dtype=torch.float64)
    with torch.no_grad():
        layer.to_qkv.weight.mul_(3.0)  # peaked attention: a well-conditioned kernel
        got = layer(x).out
        ref = _exact_attention(layer, x)
        # ... and the short-sequence shortcut computes that limit directly
        layer.mode = "short"
        shortcut = layer(x).out
    assert torch.allclose(got, ref, atol=1e-6), (got - ref).abs().max()
    assert torch.allclose(shortcut, ref, atol=1e-12), (shortcut - ref).abs().max()


@pytest.mark.parametrize("mode", ["auto", "short"])
@pytest.mark.parametrize("cls_only", [False, True])
def test_short_samples_get_exact_attention_long_ones_nystrom_in_one_batch(cls_only, mode):
    """Samples up to the layer's exact limit (auto: the FLOP crossover; short: m = 6) take the
    exact path, longer ones Nyström; every sample in the padded batch equals itself alone, the
    short ones equal exact attention and the long ones are really approximated."""
    torch.manual_seed(4)
    layer = NystromAttention(8, heads=2, landmarks=6, conv_kernel=5, mode=mode).double().eval()
    limit = layer.exact_max_tokens
    assert limit == (exact_attention_max_tokens(8, 2, 6, 6) if mode == "auto" else 6)
    lengths = [limit + 7, 3, limit + 14, limit]
    total = max(lengths)
    xs = [torch.randn(1, n, 8, dtype=torch.float64) for n in lengths]
    batch = torch.randn(4, total, 8, dtype=torch.float64) * 50  # garbage padding
    keys = torch.zeros(4, total, dtype=torch.bool)
    for i, x in enumerate(xs):
        batch[i, : lengths[i]] = x[0]
        keys[i, 1 : lengths[i]] = True
    with torch.no_grad():
        res = layer(batch, lengths=torch.tensor(lengths), cls_key_mask=keys, cls_only=cls_only)
        for i, x in enumerate(xs):
            alone = layer(x, cls_key_mask=keys[i : i + 1, : lengths[i]], cls_only=cls_only)
            n_out = 1 if cls_only else lengths[i]
            assert torch.allclose(res.out[i, :n_out], alone.out[0], atol=1e-10)
            assert torch.allclose(
                res.cls_attention[i, : lengths[i]], alone.cls_attention[0], atol=1e-12
            )
            if lengths[i] <= limit:
                assert torch.allclose(alone.out[0], _exact_attention(layer, x)[0, :n_out], atol=1e-12)
            else:  # the long ones really are approximated (not silently exact)
                assert not torch.allclose(
                    alone.out[0], _exact_attention(layer, x)[0, :n_out], atol=1e-6
                )


def test_nystrom_is_close_to_exact_with_few_landmarks_on_smooth_inputs():
    # with fewer landmarks it is an approximation: check it is a reasonable one
    torch.manual_seed(1)
    n, dim = 64, 16
    layer = NystromAttention(
        dim, heads=2, landmarks=16, pinv_iterations=6, conv_kernel=0, mode="nystrom"
    ).double()
    base = torch.randn(1, 16, dim, dtype=torch.float64)
    x = base.repeat_interleave(4, dim=1) + 0.01 * torch.randn(1, n, dim, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x).out
        ref = _exact_attention(layer, x)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05


def test_cls_attention_is_the_exact_softmax_row():
    torch.manual_seed(2)
    layer = NystromAttention(16, heads=4, landmarks=3, conv_kernel=3).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    keys = torch.zeros(2, 10, dtype=torch.bool)
    keys[:, 1:8] = True
    with torch.no_grad():
        res = layer(x, cls_key_mask=keys)
        q, k, _ = layer.to_qkv(x).reshape(2, 10, 3, 4, 4).permute(2, 0, 3, 1, 4)
        logits = (q[:, :, :1] @ k.transpose(-1, -2)[:, :, :, 1:8]).squeeze(2) * layer.scale
    ref = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, 7]
    att = res.cls_attention
    assert att is not None
    assert torch.allclose(att[:, 1:8], ref, atol=1e-12)
    assert (att[:, 0] == 0).all() and (att[:, 8:] == 0).all()
    assert torch.allclose(att.sum(-1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["auto", "nystrom", "reference"])
@pytest.mark.parametrize("landmarks", [3, 4, 7, 32])
def test_padding_is_masked_exactly(landmarks, mode):
    """A sample inside a padded batch gives the same output as alone (valid positions)."""
    torch.manual_seed(3)
    layer = NystromAttention(8, heads=2, landmarks=landmarks, conv_kernel=5, mode=mode)
    layer = layer.double().eval()
    lengths = [13, 5, 1, 20]
    xs = [torch.randn(1, n, 8, dtype=torch.float64) for n in lengths]
    batch = torch.randn(4, 20, 8, dtype=torch.float64) * 50  # garbage padding
    for i, x in enumerate(xs):
        batch[i, : lengths[i]] = x[0]
    with torch.no_grad():
        out = layer(batch, lengths=torch.tensor(lengths)).out
        for i, x in enumerate(xs):
            alone = layer(x).out
            assert torch.allclose(out[i, : lengths[i]], alone[0], atol=1e-10)


@pytest.mark.parametrize(
    ("length", "landmarks"), [(1, 4), (7, 4), (8, 4), (9, 4), (50, 7), (3, 16)]
)
def test_dense_and_masked_landmarks_agree(length, landmarks):
    layer = NystromAttention(8, heads=2, landmarks=landmarks)
    t = torch.randn(2, 2, length, 4, dtype=torch.float64)
    dense, dense_valid = layer._landmarks_dense(t)
    masked, masked_valid = layer._landmarks_masked(t, torch.tensor([length, length]))
    assert torch.allclose(dense, masked, atol=1e-12)
    expected_valid = (
        torch.ones(2, landmarks, dtype=torch.bool) if dense_valid is None else dense_valid
    )
    assert torch.equal(masked_valid, expected_valid)
    # each valid landmark is the mean of a contiguous segment; all tokens are covered once
    seg = -(-length // landmarks)
    counts = torch.zeros(landmarks)
    pad = landmarks * seg - length
    for j in range(length):
        counts[(j + pad) // seg] += 1
    sums = masked * counts.clamp(min=1)[None, None, :, None].double()
    assert torch.allclose(sums.sum(dim=2), t.sum(dim=2), atol=1e-10)


@pytest.mark.parametrize("landmarks", [4, 16])  # 16: the second sample takes the exact path
def test_nystrom_runs_under_bf16_autocast(landmarks):
    layer = NystromAttention(16, heads=2, landmarks=landmarks, mode="short")
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(
            x, lengths=torch.tensor([30, 11]), cls_key_mask=torch.ones(2, 30, dtype=torch.bool)
        )
    ref = layer(x, lengths=torch.tensor([30, 11])).out
    assert torch.isfinite(out.out.float()).all()
    assert torch.allclose(out.out.float(), ref, atol=0.1)
    assert out.cls_attention is not None and out.cls_attention.dtype == torch.float32


def test_no_quadratic_memory_at_50k_tokens():
    """50,000 tokens: an N x N float32 matrix alone would need 10 GB; we stay under 400 MB."""
    code = textwrap.dedent(
        """
        import resource, torch
        torch.set_num_threads(1)
        from mirror_model.models import create_model
        m = create_model("mirror", patch_dim=16, n_genes=10, embed_dim=16, slide_heads=2,
                         slide_landmarks=8, n_prototypes=4).eval()
        x = torch.randn(50_000, 16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.inference_mode():
            enc = m.encode_slide(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert enc.attention.shape == (1, 50_000)
        print((after - before) / 1024.0)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    extra_mb = float(res.stdout.strip().splitlines()[-1])
    assert extra_mb < 400, f"peak memory grew by {extra_mb:.0f} MB"


def test_ppeg_single_fused_convolution_equals_sum_of_convolutions():
    torch.manual_seed(4)
    ppeg = PPEG(6, (7, 5, 3)).double()
    grid = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    ref = grid + sum(conv(grid) for conv in ppeg.convs)
    assert torch.allclose(ppeg(grid), ref, atol=1e-12)
    # channels_last views (how TransMIL calls it) give the same numbers
    cl = grid.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.allclose(ppeg(cl), ref, atol=1e-12)


def test_chunk_attention_attends_across_feature_chunks():
    """The MIRROR RNA 'attention' is a heads x heads attention among feature chunks."""
    torch.manual_seed(5)
    heads, dim = 3, 12
    att = ChunkAttention(dim, heads=heads).double()
    x = torch.randn(2, dim, dtype=torch.float64)
    qkv = att.qkv(x).reshape(2, 3, heads, dim // heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B, chunks, chunk width]
    w = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)  # [B, 3, 3]
    mixed = (w @ v).transpose(1, 2).reshape(2, dim)  # authors' interleaved layout
    assert torch.allclose(att(x), att.proj(mixed), atol=1e-12)


def test_sinusoidal_positions():
    table = sinusoidal_positions(5, 6)
    assert table.shape == (5, 6)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert table[3, 0].item() == pytest.approx(torch.sin(torch.tensor(3.0)).item())
    assert table[3, 3].item() == pytest.approx(
        torch.cos(torch.tensor(3.0 / 10000 ** (2 / 6))).item()
    )
    assert sinusoidal_positions(100_001, 4).shape == (100_001, 4)  # any length


def test_value_conv_sees_zeros_beyond_the_sequence():
    # the conv residual of a 1-token sequence is w_center * v (zero padding on both sides)
    layer = NystromAttention(4, heads=1, landmarks=2, conv_kernel=3, dropout=0.0).double()
    x = torch.randn(1, 1, 4, dtype=torch.float64)
    with torch.no_grad():
        _, _, v = layer.to_qkv(x).chunk(3, dim=-1)
        expected_conv = layer.res_conv.weight[0, 0, 1, 0] * v
        out_with = layer(x).out
        layer.res_conv.weight.zero_()
        out_without = layer(x).out
    assert torch.allclose(
        out_with - out_without, F.linear(expected_conv, layer.to_out.weight), atol=1e-12
    )


@pytest.mark.parametrize("mode", ["nystrom", "auto", "reference"])
@pytest.mark.parametrize(("landmarks", "conv_kernel"), [(4, 5), (7, 33), (32, 0)])
def test_cls_only_equals_position_zero_of_the_full_output(landmarks, conv_kernel, mode):
    """The last-layer shortcut gives the full layer's position-0 output and CLS attention,
    unbatched and inside a padded batch, and its gradient flows to the same parameters."""
    torch.manual_seed(5)
    layer = NystromAttention(8, heads=2, landmarks=landmarks, conv_kernel=conv_kernel, mode=mode)
    layer = layer.double().eval()
    lengths = torch.tensor([13, 5, 1, 20])
    x = torch.randn(4, 20, 8, dtype=torch.float64)
    mask = torch.arange(20)[None] < lengths[:, None]
    for lens in (None, lengths):
        full = layer(x, lengths=lens, cls_key_mask=mask)
        cls = layer(x, lengths=lens, cls_key_mask=mask, cls_only=True)
        assert cls.out.shape == (4, 1, 8)
        assert torch.allclose(cls.out, full.out[:, :1], atol=1e-10)
        assert torch.allclose(cls.cls_attention, full.cls_attention, atol=1e-12)
    # gradients: same for every parameter when only the CLS output feeds the loss
    g_full = torch.autograd.grad(layer(x).out[:, 0].square().sum(), list(layer.parameters()))
    g_cls = torch.autograd.grad(
        layer(x, cls_only=True).out[:, 0].square().sum(), list(layer.parameters())
    )
    for a, b in zip(g_full, g_cls, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("mode", ["auto", "nystrom", "reference", "short"])
def test_query_index_equals_the_full_output_at_those_positions(mode):
    """Outputs only at chosen positions (the retention decoder's masked tiles) equal the full
    layer's rows there, unbatched and in a padded batch mixing exact and Nyström samples, and
    give the same gradients when only those rows feed the loss."""
    torch.manual_seed(6)
    layer = NystromLayer(8, heads=2, landmarks=6, conv_kernel=5, dropout=0.0, mode=mode).double()
    limit = layer.attn.exact_max_tokens or 6
    lengths = torch.tensor([limit + 9, 4, limit, limit + 2])
    total = int(lengths.max())
    x = torch.randn(4, total, 8, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(int(n), generator=g)[:3] for n in lengths])
    for lens in (None, lengths):
        full = layer(x, lengths=lens).out
        part = layer(x, lengths=lens, query_index=index).out
        assert part.shape == (4, 3, 8)
        expected = full.gather(1, index[:, :, None].expand(-1, -1, 8))
        assert torch.allclose(part, expected, atol=1e-10)
        params = [x, *layer.parameters()]
        g_full = torch.autograd.grad(expected.square().sum(), params)
        g_part = torch.autograd.grad(part.square().sum(), params)
        for a, b in zip(g_full, g_part, strict=True):
            assert torch.allclose(a, b, atol=1e-9)
    with pytest.raises(ValueError, match="exclusive"):
        layer(x, cls_only=True, query_index=index)


@pytest.mark.parametrize("kernel", [(7, 7), (33, 1), (3, 5)])
def test_depthwise_conv_backward_equals_the_convolution_backward(kernel):
    """The faster depthwise backward (flip-kernel convolution for the input, one correlation
    per sample for the weight) gives F.conv2d's output and gradients: float64 to 1e-12, float32
    to 1e-6 (relative), and under bf16 autocast no further from the float64 values than F.conv2d's own bf16 backward."""
    from mirror_model.layers._dwconv import depthwise_conv2d

    torch.manual_seed(7)
    c = 6
    pad = (kernel[0] // 2, kernel[1] // 2)
    x0 = torch.randn(3, 11, 9, c, dtype=torch.float64).permute(0, 3, 1, 2)  # channels_last view
    w0 = torch.randn(c, 1, *kernel, dtype=torch.float64)
    b0 = torch.randn(c, dtype=torch.float64)
    go = torch.randn(3, c, 11, 9, dtype=torch.float64)

    def run(fn, dtype, autocast):
        x, w, b = (t.to(dtype).detach().requires_grad_() for t in (x0, w0, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x, w, b)
        out.backward(go.to(out.dtype))
        return [t.double() for t in (out, x.grad, w.grad, b.grad)]

    ref = run(lambda x, w, b: F.conv2d(x, w, b, padding=pad, groups=c), torch.float64, False)
    new = run(lambda x, w, b: depthwise_conv2d(x, w, b, pad), torch.float64, False)
    for a, r in zip(new, ref, strict=True):
        assert torch.allclose(a, r, atol=1e-12)
    new32 = run(lambda x, w, b: depthwise_conv2d(x, w, b, pad), torch.float32, False)
    for a, r in zip(new32, ref, strict=True):
        assert ((a - r).norm() / r.norm()).item() < 1e-6
    old16 = run(lambda x, w, b: F.conv2d(x, w, b, padding=pad, groups=c), torch.float32, True)
    new16 = run(lambda x, w, b: depthwise_conv2d(x, w, b, pad), torch.float32, True)
    for a, o, r in zip(new16, old16, ref, strict=True):
        err_new = ((a - r).norm() / r.norm()).item()
        err_old = ((o - r).norm() / r.norm()).item()
        assert err_new < 1e-2 and err_new <= 1.5 * err_old + 1e-3, (err_new, err_old)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def test_ppeg_gradients_equal_the_sum_of_convolutions():
    """PPEG (one fused kernel, the faster depthwise backward) has the output and gradients of
    the identity plus its three convolutions: float64 to 1e-12, float32 to 1e-6 (relative),
    bf16 autocast no further from float64 than the plain convolutions under bf16 (+0.1 %)."""
    torch.manual_seed(8)
    ppeg64 = PPEG(6, (7, 5, 3)).double()
    grid64 = torch.randn(2, 9, 9, 6, dtype=torch.float64).permute(0, 3, 1, 2)

    def run(fused, dtype, autocast):
        ppeg = PPEG(6, (7, 5, 3)).to(dtype)
        ppeg.load_state_dict(ppeg64.state_dict())
        grid = grid64.to(dtype).requires_grad_()
        params = [grid, *ppeg.parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ppeg(grid) if fused else grid + sum(conv(grid) for conv in ppeg.convs)
        grads = torch.autograd.grad(out.float().sin().sum(), params)
        return [out.double(), *(gr.double() for gr in grads)]

    ref = run(False, torch.float64, False)
    for a, b in zip(run(True, torch.float64, False), ref, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    for a, b in zip(run(True, torch.float32, False), ref, strict=True):
        assert _rel(a, b) < 1e-6
    old16 = run(False, torch.float32, True)
    for a, o, b in zip(run(True, torch.float32, True), old16, ref, strict=True):
        assert _rel(a, b) <= 1.5 * _rel(o, b) + 1e-3, (_rel(a, b), _rel(o, b))


@pytest.mark.parametrize("mode", ["auto", "nystrom", "reference"])
def test_query_index_in_float32_and_bf16(mode):
    """query_index at working precision: float32 rows and gradients within 1e-5 (relative) of
    float64, bf16 autocast no further from float64 than the full layer's own bf16 rows (+0.5 %)."""
    torch.manual_seed(9)
    layer64 = NystromLayer(16, heads=2, landmarks=6, conv_kernel=5, dropout=0.0, mode=mode).double()
    lengths = torch.tensor([40, 7, 25])
    x64 = torch.randn(3, 40, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    index = torch.stack([torch.randperm(int(n), generator=g)[:5] for n in lengths])

    def run(partial, dtype, autocast):
        layer = NystromLayer(16, heads=2, landmarks=6, conv_kernel=5, dropout=0.0, mode=mode)
        layer.load_state_dict(layer64.state_dict())
        layer = layer.to(dtype)
        x = x64.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if partial:
                out = layer(x, lengths=lengths, query_index=index).out
            else:
                out = layer(x, lengths=lengths).out.gather(1, index[:, :, None].expand(-1, -1, 16))
        grads = torch.autograd.grad(out.float().square().sum(), [x, *layer.parameters()])
        return [out.double(), *(gr.double() for gr in grads)]

    ref = run(False, torch.float64, False)
    for a, b in zip(run(True, torch.float32, False), ref, strict=True):
        assert _rel(a, b) < 1e-5
    old16 = run(False, torch.float32, True)
    for a, o, b in zip(run(True, torch.float32, True), old16, ref, strict=True):
        assert _rel(a, b) <= 1.5 * _rel(o, b) + 5e-3, (_rel(a, b), _rel(o, b))
