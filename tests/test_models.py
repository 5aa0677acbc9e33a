"""MirrorModel and encoders: attention semantics, padding, invariances, losses, training, presets."""

from __future__ import annotations

import pytest
import torch

from mirror_model.config import list_presets
from mirror_model.errors import ConfigError, ExpressionError, FeatureFileError, MirrorError
from mirror_model.models import (
    MirrorModel,
    SlideRetention,
    checkpoint_filter_fn,
    create_model,
    create_rna_encoder,
    create_slide_encoder,
    get_preset,
)
from mirror_model.models._common import sample_masks

SMALL = dict(
    patch_dim=12,
    n_genes=20,
    embed_dim=24,
    slide_heads=4,
    rna_heads=4,
    slide_landmarks=5,
    n_prototypes=16,
    style_hidden_dims=(16, 8),
    latent_dim=4,
    rna_mlp_hidden_dims=(16,),
    abmil_attention_dim=8,
)


def small(preset: str = "mirror", **kw) -> MirrorModel:
    torch.manual_seed(0)
    return create_model(preset, **{**SMALL, **kw})


def padded_batch(sizes, n_max, dim, scatter=True, seed=0):
    """Bags of the given sizes inside one padded batch; real tiles at random positions."""
    g = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in sizes]
    x = torch.randn(len(sizes), n_max, dim, generator=g, dtype=torch.float64) * 30
    mask = torch.zeros(len(sizes), n_max, dtype=torch.bool)
    positions = []
    for b, bag in enumerate(bags):
        pos = (
            torch.randperm(n_max, generator=g)[: len(bag)].sort().values
            if scatter
            else torch.arange(len(bag))
        )
        x[b, pos] = bag
        mask[b, pos] = True
        positions.append(pos)
    return bags, x, mask, positions


def _cells(m, b: int, n: int) -> dict:
    """``positions=`` for a model that needs tile positions (mirror-grid): tiles in one row."""
    if not m.needs_positions:
        return {}
    row = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], dim=-1)
    return {"positions": row.expand(b, n, 2)}


# ---------------------------------------------------------------------- API and shapes
@pytest.mark.parametrize("preset", list_presets())
def test_forward_and_encoders_have_the_documented_shapes(preset):
    m = small(preset)
    x, r = torch.randn(3, 17, 12), torch.randn(3, 20)
    out = m(features=x, rna=r, **_cells(m, 3, 17))
    cfg = m.config
    assert set(out.losses) == set(cfg.active_losses)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    expected = sum(cfg.loss_weights[k] * v for k, v in out.losses.items())
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert out.slide_embedding.shape == out.rna_embedding.shape == (3, 24)
    assert out.attention.shape == (3, 17)
    m.eval()
    with torch.no_grad():
        enc = m.encode_slide(x[0], **_cells(m, 1, 17))  # [N, Dp] -> B = 1
        assert enc.embedding.shape == (1, 24) and enc.attention.shape == (1, 17)
        assert m.encode_rna(r[0]).shape == (1, 24)
        assert m.encode_rna(r).shape == (3, 24)


def test_registry_builders():
    cfg = get_preset("mirror", **SMALL)
    assert type(create_slide_encoder(cfg)).__name__ == "TransMILEncoder"
    assert type(create_rna_encoder(cfg)).__name__ == "MirrorRNAEncoder"
    tcfg = get_preset("tangle", **SMALL)
    assert type(create_slide_encoder(tcfg)).__name__ == "GatedABMILEncoder"
    assert type(create_rna_encoder(tcfg)).__name__ == "MlpRNAEncoder"
    assert create_model(cfg).config == cfg
    assert create_model(cfg.to_dict()).config == cfg
    # the documented example works even though 128 is not a multiple of 12 RNA heads
    m = create_model("mirror", patch_dim=64, n_genes=300, embed_dim=128)
    assert m.config.rna_heads == 8 and m.config.landmarks == 64
    with pytest.raises(ConfigError):
        create_model(3.5)  # type: ignore[arg-type]


def test_either_modality_alone_works():
    m = small().eval()
    with torch.no_grad():
        assert m.encode_slide(torch.randn(40, 12)).embedding.shape == (1, 24)
        assert m.encode_rna(torch.randn(2, 20)).shape == (2, 24)
    with pytest.raises(ValueError, match="encode_slide"):
        m(features=torch.randn(1, 4, 12), rna=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 37])
def test_transmil_accepts_any_tile_count(n):
    m = small().eval()
    with torch.no_grad():
        enc = m.encode_slide(torch.randn(n, 12))
    assert enc.attention.shape == (1, n)
    assert torch.isfinite(enc.embedding).all()
    assert enc.attention.sum().item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------- attention and padding
@pytest.mark.parametrize("preset", ["mirror", "tangle"])
def test_attention_is_a_distribution_over_real_tiles_and_padding_is_ignored(preset):
    m = small(preset).double().eval()
    sizes = [9, 25, 1, 14]
    bags, x, mask, positions = padded_batch(sizes, 30, 12)
    with torch.no_grad():
        batched = m.encode_slide(x, tile_mask=mask)
        att = batched.attention
        assert (att >= 0).all()
        assert torch.allclose(att.sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-12)
        assert (att[~mask] == 0).all()  # masked tiles get exactly 0
        for b, bag in enumerate(bags):
            alone = m.encode_slide(bag)
            # padding content and position do not change the real tiles' results
            assert torch.allclose(alone.embedding[0], batched.embedding[b], atol=1e-10)
            assert torch.allclose(alone.attention[0], att[b, positions[b]], atol=1e-12)


@pytest.mark.parametrize("layer", ["first", "last"])
def test_transmil_heatmap_is_the_exact_cls_row_of_the_chosen_layer(layer):
    """The heatmap is softmax(q_cls · k_i / sqrt(d)) of layer 1 (keys = the tiles) or of layer 2
    (keys = tokens after PPEG), averaged over heads, over the real tiles only (the CLS key and
    the square-padding duplicates excluded), in input order."""
    m = small("mirror", heatmap_layer=layer).double().eval()
    enc = m.slide_encoder
    n = 11  # padded to 16 for PPEG: positions 12..16 are duplicates and get no attention
    x = torch.randn(n, 12, dtype=torch.float64)
    seen = {}
    target = enc.layer1 if layer == "first" else enc.layer2
    hook = target.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        att = m.encode_slide(x).attention[0]
        hook.remove()
        attn = target.attn
        h = target.norm(seen["x"])[0]  # [1 + 16, D]
        q, k, _ = attn.to_qkv(h).reshape(h.shape[0], 3, attn.heads, attn.head_dim).unbind(1)
        logits = torch.einsum("hd,nhd->hn", q[0], k[1 : 1 + n]) * attn.scale
        expected = logits.softmax(dim=-1).mean(dim=0)
    assert torch.allclose(att, expected, atol=1e-12)
    other = small("mirror", heatmap_layer="last" if layer == "first" else "first").double().eval()
    with torch.no_grad():
        assert not torch.allclose(other.encode_slide(x).attention[0], att, atol=1e-3)
        # the choice changes the map only, never the embedding
        assert torch.allclose(other.encode_slide(x).embedding, m.encode_slide(x).embedding)


def test_abmil_is_invariant_to_tile_order():
    m = small("tangle").double().eval()
    x = torch.randn(31, 12, dtype=torch.float64)
    perm = torch.randperm(31)
    with torch.no_grad():
        a, b = m.encode_slide(x), m.encode_slide(x[perm])
    assert torch.allclose(a.embedding, b.embedding, atol=1e-12)
    assert torch.allclose(a.attention[0, perm], b.attention[0], atol=1e-14)


def test_transmil_is_not_invariant_to_tile_order():
    """PPEG (grid neighbours) and the value conv (sequence neighbours) make TransMIL order-dependent.

    This is the authors' architecture: tiles are fed in random order, so the 'positions' carry no
    tissue geometry. The test states it by asserting that a permutation changes the embedding.
    """
    m = small().double().eval()
    x = torch.randn(31, 12, dtype=torch.float64)
    perm = torch.randperm(31)
    with torch.no_grad():
        a, b = m.encode_slide(x), m.encode_slide(x[perm])
    assert not torch.allclose(a.embedding, b.embedding, atol=1e-6)


def test_tile_mask_errors_are_clear():
    m = small().eval()
    x = torch.randn(2, 5, 12)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ConfigError, match=r"row\(s\) \[1\]"):
        m.encode_slide(x, tile_mask=mask)
    with pytest.raises(ConfigError, match="tile_mask"):
        m.encode_slide(x, tile_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(FeatureFileError, match="patch_dim=12"):
        m.encode_slide(torch.randn(5, 13))
    with pytest.raises(FeatureFileError, match="NaN"):
        m.encode_slide(torch.full((5, 12), float("nan")))
    with pytest.raises(FeatureFileError, match="no tiles"):
        m.encode_slide(torch.randn(0, 12))
    with pytest.raises(ExpressionError, match="n_genes=20"):
        m.encode_rna(torch.randn(2, 19))
    with pytest.raises(ExpressionError, match="NaN"):
        m.encode_rna(torch.full((1, 20), float("nan")))
    with pytest.raises(ConfigError, match="move them first"):
        m.encode_slide(torch.randn(5, 12, device="meta"))
    with pytest.raises(ConfigError, match="move it first"):
        m.encode_rna(torch.randn(2, 20, device="meta"))
    with pytest.raises(MirrorError, match="paired"):
        m(torch.randn(2, 5, 12), torch.randn(3, 20))


# ---------------------------------------------------------------------- retention
def test_realised_mask_ratio_and_masks_only_real_tiles():
    m = small(slide_mask_ratio=0.75, rna_mask_ratio=0.5)
    sizes = [8, 20, 1, 13]
    _, x, mask, _ = padded_batch(sizes, 24, 12)
    out = m(x.float(), torch.randn(4, 20), tile_mask=mask)
    sm = out.slide_retention_mask
    assert sm is not None and sm.shape == (4, 24)
    assert not (sm & ~mask).any()  # never a padding tile
    assert sm.sum(1).tolist() == [n - int(n * 0.25) for n in sizes]
    rm = out.rna_retention_mask
    assert rm is not None and rm.shape == (4, 24)
    assert rm.sum(1).tolist() == [24 - int(24 * 0.5)] * 4


def test_retention_masks_are_reproducible_with_a_generator():
    m = small().eval()
    x, r = torch.randn(2, 11, 12), torch.randn(2, 20)
    with torch.no_grad():
        a = m(x, r, generator=torch.Generator().manual_seed(7))
        b = m(x, r, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.slide_retention_mask, b.slide_retention_mask)
    assert torch.equal(a.rna_retention_mask, b.rna_retention_mask)
    assert a.loss.item() == b.loss.item()  # eval: no dropout, style latent = mu


def test_sample_masks_are_uniform():
    torch.manual_seed(0)
    masks = sample_masks(torch.tensor([10] * 4000), 12, 0.3)
    assert (masks.sum(1) == 10 - int(10 * 0.7)).all()
    assert not masks[:, 10:].any()
    freq = masks[:, :10].float().mean(0)
    assert torch.allclose(freq, torch.full((10,), 0.3), atol=0.03)


def test_slide_retention_loss_ignores_unmasked_predictions_and_stop_gradient_detaches():
    cfg = get_preset("mirror", **SMALL)
    ret = SlideRetention(cfg)
    tokens = torch.randn(2, 9, 24, requires_grad=True)
    cls = torch.randn(2, 24)
    res = ret(cls, tokens, torch.tensor([9, 9]), uniform=True)
    assert res.target.requires_grad
    res_sg = ret(cls, tokens, torch.tensor([9, 9]), uniform=True, stop_gradient=True)
    assert not res_sg.target.requires_grad and res_sg.pred.requires_grad
    # the model option reaches the branch: with stop-gradient, the target path carries no gradient
    m = small(retention_stop_gradient=True, weight_align=0.0, weight_ret_rna=0.0, weight_style=0.0,
              weight_cluster=0.0)  # fmt: skip
    out = m(torch.randn(2, 9, 12), torch.randn(2, 20))
    assert set(out.losses) == {"ret_slide"}
    out.loss.backward()
    assert (
        m.slide_encoder.fc[0].weight.grad is not None
    )  # gradient still flows via the decoder input


# ---------------------------------------------------------------------- alignment / style
def test_logit_scale_is_clamped_at_its_maximum():
    m = small()
    with torch.no_grad():
        m.logit_scale.fill_(10.0)  # exp(10) >> 100
    s = m.current_logit_scale()
    assert s.item() == pytest.approx(100.0)
    s.backward()
    assert m.logit_scale.grad.item() == 0.0
    m.logit_scale.grad = None
    with torch.no_grad():
        m.logit_scale.fill_(1.0)
    s = m.current_logit_scale()
    s.backward()
    assert s.item() == pytest.approx(torch.e, rel=1e-6) and m.logit_scale.grad.item() > 0


def test_alignment_heads_normalise_before_the_projection():
    m = small()
    e = torch.randn(3, 24)
    expected = m.slide_head(torch.nn.functional.normalize(e, dim=-1))
    assert torch.allclose(m.project_slide(e), expected)
    assert torch.allclose(m.project_slide(5 * e), expected, atol=1e-6)  # scale-free input
    m2 = small(align_normalize_after_head=True)
    assert torch.allclose(m2.project_rna(e).norm(dim=-1), torch.ones(3), atol=1e-6)


def test_style_bottleneck_samples_in_training_and_uses_mu_in_eval():
    m = small()
    e = torch.randn(4, 24)
    m.train()
    a, b = m.style(e).scores, m.style(e).scores
    assert not torch.allclose(a, b)
    m.eval()
    a, b = m.style(e), m.style(e)
    assert torch.equal(a.scores, b.scores)
    expected = m.style.prototypes(m.style.decoder(a.mu))
    assert torch.allclose(a.scores, expected)


def test_prototypes_orthogonal_init_and_renormalisation():
    m = small(n_prototypes=10)  # K <= D: orthonormal rows at init
    w = m.style.prototypes.weight.detach()
    assert torch.allclose(w @ w.t(), torch.eye(10), atol=1e-5)
    with torch.no_grad():
        m.style.prototypes.weight.mul_(torch.linspace(0.5, 3, 10)[:, None])
    m.renormalize_prototypes()
    assert torch.allclose(m.style.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    small("tangle").renormalize_prototypes()  # no style module: a no-op


# ---------------------------------------------------------------------- gradients and training
@pytest.mark.parametrize("preset", list_presets())
def test_every_trainable_parameter_receives_a_gradient(preset):
    m = small(preset)
    _, x, mask, _ = padded_batch([10, 16, 7], 16, 12)
    out = m(x.float(), torch.randn(3, 20), tile_mask=mask, **_cells(m, 3, 16))
    out.loss.backward()
    missing = [
        n
        for n, p in m.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, missing


def test_adam_steps_on_a_paired_toy_set_lower_every_loss_term():
    torch.manual_seed(0)
    m = small(slide_dropout=0.0, rna_dropout=0.0)
    # toy cohort: each patient's expression and tiles derive from one latent factor
    z = torch.randn(8, 4)
    x = (z @ torch.randn(4, 12))[:, None, :] + 0.3 * torch.randn(8, 10, 12)
    r = z @ torch.randn(4, 20) + 0.1 * torch.randn(8, 20)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def evaluate():
        torch.manual_seed(123)  # same retention masks and style noise for the comparison
        with torch.no_grad():
            return {k: v.item() for k, v in m(x, r).losses.items()}

    before = evaluate()
    for step in range(40):
        torch.manual_seed(step)
        m.renormalize_prototypes()
        opt.zero_grad()
        m(x, r).loss.backward()
        opt.step()
    after = evaluate()
    assert set(before) == {"align", "ret_slide", "ret_rna", "style", "cluster"}
    for k in before:
        assert after[k] < before[k], (k, before[k], after[k])


# ---------------------------------------------------------------------- precision, devices, checkpoints
@pytest.mark.parametrize("preset", ["mirror", "tangle"])
def test_bf16_autocast_forward_on_cpu(preset):
    m = small(preset)
    x, r = torch.randn(2, 23, 12), torch.randn(2, 20)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, r, tile_mask=mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    m.eval()
    with torch.no_grad():
        ref = m.encode_slide(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m.encode_slide(x, mask)
    assert torch.allclose(low.attention.float().sum(1), torch.ones(2), atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(low.embedding.float(), ref.embedding, dim=-1)
    assert (cos > 0.99).all()


def test_state_dict_round_trip_and_checkpoint_filter():
    m = small().eval()
    clone = create_model(m.config).eval()
    prefixed = {f"module.{k}": v for k, v in m.state_dict().items()}  # DDP-saved checkpoint
    clone.load_state_dict(prefixed)
    x = torch.randn(14, 12)
    with torch.no_grad():
        assert torch.equal(m.encode_slide(x).embedding, clone.encode_slide(x).embedding)
    assert set(checkpoint_filter_fn({"_orig_mod.module.a": 1, "b": 2})) == {"a", "b"}  # type: ignore[dict-item]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_matches_cpu():
    m = small().eval()
    x, r = torch.randn(2, 30, 12), torch.randn(2, 20)
    with torch.no_grad():
        ref = m.encode_slide(x)
        mc = m.cuda()
        got = mc.encode_slide(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = mc.encode_slide(x.cuda())
            mc.train()
            out = mc(x.cuda(), r.cuda())
    assert torch.allclose(got.embedding.cpu(), ref.embedding, atol=1e-4)
    assert torch.isfinite(low.embedding.float()).all() and torch.isfinite(out.loss)


def test_transmil_embedding_is_the_same_with_and_without_tokens():
    """Without tokens the last layer computes only its CLS output: same embedding and attention."""
    torch.manual_seed(0)
    cfg = get_preset("mirror", embed_dim=32, patch_dim=12, n_genes=10)
    enc = create_slide_encoder(cfg).double().eval()
    feats = torch.randn(3, 40, 12, dtype=torch.float64)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 17:] = False
    mask[2, 3:] = False
    with torch.no_grad():
        full = enc(feats, mask, return_tokens=True)
        cls = enc(feats, mask, return_tokens=False)
    assert cls.tokens is None and full.tokens is not None
    assert torch.allclose(cls.embedding, full.embedding, atol=1e-10)
    assert torch.allclose(cls.attention, full.attention, atol=1e-12)


def _decode_every_position(ret, cls, tokens, lengths, uniform, generator):
    """The retention decoder as written before it computed only the masked tiles: embed every
    tile, decode every position, read the loss at the masked ones."""
    from mirror_model.layers import sinusoidal_positions
    from mirror_model.losses import retention_loss

    _, n, d = tokens.shape
    x = ret.embed(torch.cat([cls[:, None], tokens], dim=1))
    mask = sample_masks(lengths, n, ret.ratio, generator=generator)
    tiles = torch.where(mask[..., None], ret.mask_token.to(x.dtype), x[:, 1:])
    x = torch.cat([x[:, :1], tiles], dim=1)
    x = x + sinusoidal_positions(n + 1, d, device=x.device, dtype=x.dtype)
    for layer in ret.layers:
        x = layer(x, lengths=None if uniform else lengths + 1).out
    pred = ret.head(ret.norm(x))[:, 1:]
    return retention_loss(pred, tokens, mask), mask


@pytest.mark.parametrize("mode", ["auto", "nystrom", "reference"])
@pytest.mark.parametrize("depth", [1, 2])
def test_slide_retention_on_masked_tiles_only_equals_decoding_every_position(mode, depth):
    """The decoder computes the last layer and the head at the masked tiles only and embeds the
    kept tiles only; loss, mask and every gradient equal decoding every position: float64 to
    1e-10, float32 to 1e-5 (relative), bf16 autocast no further from float64 than the full
    decoder's own bf16 result (+0.5 %). Batches mix exact (<= 22 tokens here) and Nyström
    samples, and samples with fewer masked tiles than the batch's maximum."""
    cfg = get_preset("mirror", **{**SMALL, "slide_attention": mode, "slide_decoder_depth": depth})
    torch.manual_seed(3)
    ret64 = SlideRetention(cfg).double().eval()  # eval: dropout off, both runs see the same net
    g = torch.Generator().manual_seed(4)
    tokens64 = torch.randn(3, 31, 24, generator=g, dtype=torch.float64)
    cls64 = torch.randn(3, 24, generator=g, dtype=torch.float64)

    def run(fn, lengths, uniform, dtype, autocast):
        ret = SlideRetention(cfg).to(dtype).eval()
        ret.load_state_dict(ret64.state_dict())
        tokens = tokens64.to(dtype).requires_grad_()
        cls = cls64.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, mask = fn(ret, cls, tokens, lengths, uniform, torch.Generator().manual_seed(5))
        grads = torch.autograd.grad(loss, [tokens, cls, *ret.parameters()], allow_unused=True)
        grads = [torch.zeros(()) if gr is None else gr.double() for gr in grads]
        return [loss.double().reshape(1), *grads], mask

    def new(ret, cls, tokens, lengths, uniform, generator):
        res = ret(cls, tokens, lengths, uniform=uniform, generator=generator)
        assert res.pred.shape == res.target.shape == (3, int(res.mask.sum(1).max()), 24)
        assert torch.equal(res.row_valid.sum(1), res.mask.sum(1))
        picked = res.mask.gather(1, res.positions)
        assert torch.equal(picked & res.row_valid, res.row_valid)  # valid rows are masked tiles
        return res.loss(), res.mask

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()

    for lengths, uniform in ((torch.tensor([31, 31, 31]), True), (torch.tensor([31, 4, 17]), False)):
        ref, mask_ref = run(_decode_every_position, lengths, uniform, torch.float64, False)
        got, mask = run(new, lengths, uniform, torch.float64, False)
        assert torch.equal(mask, mask_ref)
        for a, b in zip(got, ref, strict=True):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)
        got32, _ = run(new, lengths, uniform, torch.float32, False)
        for a, b in zip(got32, ref, strict=True):
            assert rel(a, b) < 1e-5
        old16, _ = run(_decode_every_position, lengths, uniform, torch.float32, True)
        new16, _ = run(new, lengths, uniform, torch.float32, True)
        for a, o, b in zip(new16, old16, ref, strict=True):
            assert rel(a, b) <= 1.5 * rel(o, b) + 5e-3, (rel(a, b), rel(o, b))
