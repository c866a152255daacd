"""Closed-form fusion (Eq. 7): agreement with least squares, streaming, caches, UNet application, token selection."""
import pytest
import torch

from ant_nb.method.fusion import (FusionAccumulator, GramCache, anchor_pairs, closed_form_fuse, concept_token_span,
                                  fuse_into_unet, gram_from_prompts, kv_projections, token_embeddings)


def _lstsq(W, deltas, embs, pres, beta, lamb):
    "Reference W*: least squares on the stacked system, float64."
    W = W.double()
    rows = [e.reshape(-1, W.shape[1]).double() for e in embs]
    rhs = [r @ (W + d.double()).T for r, d in zip(rows, deltas)]
    if pres is not None:
        p = pres.reshape(-1, W.shape[1]).double()
        rows.append(beta ** 0.5 * p); rhs.append(beta ** 0.5 * p @ W.T)
    if lamb:
        rows.append(lamb ** 0.5 * torch.eye(W.shape[1], dtype=W.dtype)); rhs.append(lamb ** 0.5 * W.T)
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs), driver="gelsd").solution.T


def _problem(seed, out=12, d=16, q=5, n=3, m=40):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, d, generator=g)
    deltas = [0.1 * torch.randn(out, d, generator=g) for _ in range(q)]
    embs = [torch.randn(n, d, generator=g) for _ in range(q)]
    return W, deltas, embs, torch.randn(m, d, generator=g)


@pytest.mark.parametrize("seed,beta,lamb", [(0, 1.0, 0.0), (1, 0.1, 0.0), (2, 10.0, 0.5), (3, 1.0, 1e-3), (4, 0.0, 2.0)])
def test_matches_least_squares(seed, beta, lamb):
    W, deltas, embs, pres = _problem(seed)
    ours = closed_form_fuse(W, deltas, embs, pres, beta, lamb)
    ref = _lstsq(W, deltas, embs, pres, beta, lamb)
    assert ours.dtype == W.dtype and ours.shape == W.shape
    assert ((ours.double() - ref).norm() / ref.norm()).item() < 1e-4


def test_many_concepts_batched_prompts_and_gram_cache(tmp_path):
    "120 concepts given as (N, L, in) prompt embeddings, preservation through a saved and reloaded GramCache."
    g = torch.Generator().manual_seed(5)
    W = torch.randn(20, 24, generator=g)
    deltas = [0.05 * torch.randn(20, 24, generator=g) for _ in range(120)]
    embs = [torch.randn(2, 3, 24, generator=g) for _ in range(120)]
    pres = torch.randn(10, 7, 24, generator=g)
    cache = GramCache.load(GramCache(24).add(pres).save(tmp_path / "prior.safetensors"))
    assert cache.count == 70
    ours = closed_form_fuse(W, deltas, embs, cache, beta=2.0, lamb=0.1)
    ref = _lstsq(W, deltas, embs, pres, 2.0, 0.1)
    assert ((ours.double() - ref).norm() / ref.norm()).item() < 1e-4


def test_streaming_is_order_independent():
    W, deltas, embs, pres = _problem(6)
    a, b = FusionAccumulator({"w": W}), FusionAccumulator({"w": W})
    for d, e in zip(deltas, embs): a.add_concept({"w": d}, e)
    for d, e in reversed(list(zip(deltas, embs))): b.add_concept({"w": d}, e)
    for acc in (a, b): acc.add_preserve(pres, 0.5)
    torch.testing.assert_close(a.solve(0.1)["w"], b.solve(0.1)["w"], rtol=1e-6, atol=1e-6)


def test_anchor_edit_matches_least_squares():
    "add_anchor solves min Σ‖W*e − W a‖² + β Σ‖W*p − W p‖² + λ‖W* − W‖²."
    W, _, embs, pres = _problem(7)
    anchors = [torch.randn_like(e) for e in embs]
    acc = FusionAccumulator({"w": W})
    for e, a in zip(embs, anchors): acc.add_anchor(e, a)
    acc.add_preserve(pres, 1.0)
    ours = acc.solve(0.2)["w"].double()
    E, A = torch.cat(embs).double(), torch.cat(anchors).double()
    rows = torch.cat([E, pres.double(), 0.2 ** 0.5 * torch.eye(16, dtype=torch.float64)])
    rhs = torch.cat([A @ W.double().T, pres.double() @ W.double().T, 0.2 ** 0.5 * W.double().T])
    ref = torch.linalg.lstsq(rows, rhs, driver="gelsd").solution.T
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


def test_bad_inputs():
    W, deltas, embs, pres = _problem(8)
    with pytest.raises(ValueError, match="deltas"): closed_form_fuse(W, deltas[:-1], embs, pres)
    with pytest.raises(ValueError, match="W must be"): closed_form_fuse(W[0], deltas, embs, pres)
    with pytest.raises(ValueError, match="beta"): closed_form_fuse(W, deltas, embs, pres, beta=-1.0)
    with pytest.raises(ValueError, match="lamb"): closed_form_fuse(W, deltas, embs, pres, lamb=float("nan"))
    with pytest.raises(ValueError, match="embs"): closed_form_fuse(W, deltas, [e[:, :3] for e in embs], pres)
    with pytest.raises(ValueError, match="NaN"): closed_form_fuse(W, [d * float("nan") for d in deltas], embs, pres)
    with pytest.raises(TypeError, match="lists"): closed_form_fuse(W, deltas[0], embs, pres)
    with pytest.raises(ValueError, match="lamb > 0"): closed_form_fuse(W, deltas[:1], embs[:1], None)  # rank-deficient
    acc = FusionAccumulator({"w": W})
    with pytest.raises(ValueError, match="nothing to fuse"): acc.solve()
    with pytest.raises(ValueError, match="not being fused"): acc.add_concept({"v": deltas[0]}, embs[0])
    with pytest.raises(FileNotFoundError, match="path"): GramCache.load("/nonexistent/prior.safetensors")


def test_fuse_into_tiny_unet(tiny_sd):
    unet = tiny_sd.unet
    layers = kv_projections(unet)
    assert layers and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in layers)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    names = list(layers)
    g = torch.Generator().manual_seed(0)
    concepts = [({names[0]: torch.randn(layers[names[0]].weight.shape, generator=g),
                  names[3]: torch.randn(layers[names[3]].weight.shape, generator=g)}, torch.randn(4, 32, generator=g)),
                ({names[0]: torch.randn(layers[names[0]].weight.shape, generator=g)}, torch.randn(5, 32, generator=g))]
    pres = torch.randn(60, 32, generator=g)
    fuse_into_unet(unet, concepts, [(pres, 1.0)], lamb=0.01, progress=False)
    for n, p in unet.named_parameters():
        if n[:-len(".weight")] not in layers: assert torch.equal(p, before[n]), n
    expect = closed_form_fuse(before[names[0] + ".weight"], [concepts[0][0][names[0]], concepts[1][0][names[0]]],
                              [concepts[0][1], concepts[1][1]], pres, 1.0, 0.01)
    torch.testing.assert_close(layers[names[0]].weight.detach(), expect, rtol=1e-5, atol=1e-5)


def test_token_selection(tiny_sd):
    tok = tiny_sd.tokenizer
    start, stop = concept_token_span(tok, "x ab y", "ab")
    assert (start, stop) == (2, 4)  # <bos> x</w> a b</w> y</w>: the tiny tokenizer has one token per character
    with pytest.raises(ValueError, match="concept"): concept_token_span(tok, "x y", "ab")
    L, D = tok.model_max_length, 32
    assert token_embeddings(tiny_sd, ["x ab y"], "ab", "concept").shape == (2, D)
    assert token_embeddings(tiny_sd, ["x ab y", "ab"], "ab", "from_concept").shape == (L - 2 + L - 1, D)
    assert token_embeddings(tiny_sd, ["x ab y"], positions="all").shape == (L, D)
    with pytest.raises(ValueError, match="positions"): token_embeddings(tiny_sd, ["x ab y"], "ab", "middle")
    g = gram_from_prompts(tiny_sd, ["x ab y", "cd", "ef g"], batch_size=2, progress=False)
    assert g.count == 3 * L and g.dim == D
    e, a = anchor_pairs(tiny_sd, ["x ab y", "ab z"], "ab", "c")
    assert e.shape == a.shape and e.shape[1] == D


def test_kv_projections_refuses_wrapped_unet(tiny_sd):
    from ant_nb.method.lora import LoraSettings, add_lora
    add_lora(tiny_sd.unet, LoraSettings(rank=2))
    with pytest.raises(ValueError, match="adapters"): kv_projections(tiny_sd.unet)
