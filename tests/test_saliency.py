"""Tests of ant_nb.method.saliency: gradient maps (Eq. 4), thresholds, intersection (Eq. 5), mask files, masked updates (Eq. 6)."""
import pytest
import torch

from ant_nb.method.losses import AntLossConfig
from ant_nb.method.saliency import (check_mask, count_active, gradient_map, intersect, load_mask, mask_gradients,
                                    masked_parameters, saliency_mask, save_mask, threshold_map)

CFG = AntLossConfig(num_steps=10, t_prime=8)  # short schedule: cheap trajectories


def test_threshold_rules():
    g = {"a": torch.tensor([0.1, -0.5, 2.0, 0.0]), "b": torch.tensor([[-3.0, 0.2]])}
    assert threshold_map(g, gamma=0.2)["a"].tolist() == [False, True, True, False]
    assert threshold_map(g, gamma=0.2)["b"].tolist() == [[True, True]]
    assert threshold_map(g, top_fraction=0.25)["a"].tolist() == [False, False, True, False]
    assert threshold_map(g, top_fraction=0.5, keep="bottom")["a"].tolist() == [True, False, False, True]
    glob = threshold_map(g, top_fraction=0.5, scope="global")
    assert glob["a"].tolist() == [False, True, True, False] and glob["b"].tolist() == [[True, False]]
    assert threshold_map(g, top_fraction=1.0)["a"].all()


@pytest.mark.parametrize("kwargs,name", [(dict(), "gamma"), (dict(gamma=1.0, top_fraction=0.5), "top_fraction"),
                                         (dict(gamma=0.0), "gamma"), (dict(top_fraction=0.0), "top_fraction"),
                                         (dict(top_fraction=2.0), "top_fraction"),
                                         (dict(top_fraction=0.5, scope="layer"), "scope"),
                                         (dict(top_fraction=0.5, keep="lowest"), "keep")])
def test_bad_thresholds_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name): threshold_map({"a": torch.ones(3)}, **kwargs)


def test_intersection_and_curve():
    maps = [{"w": torch.tensor(v)} for v in ([1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1])]
    maps = [{k: v.bool() for k, v in m.items()} for m in maps]
    mask, curve = intersect(iter(maps), return_curve=True)
    assert mask["w"].tolist() == [False, True, False, False] and curve == [3, 2, 1, 1]
    assert maps[0]["w"].tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="empty"): intersect([])
    with pytest.raises(ValueError, match="different"): intersect([maps[0], {"v": maps[0]["w"]}])


def test_saliency_mask_is_deterministic_and_leaves_model_alone(tiny_sd):
    before = {n: p.detach().clone() for n, p in tiny_sd.unet.named_parameters()}
    a, curve = saliency_mask(tiny_sd, ["nudity", "naked"], [3, 4], top_fraction=0.3, config=CFG, return_curve=True,
                             progress=False)
    b = saliency_mask(tiny_sd, ["nudity", "naked"], [3, 4], top_fraction=0.3, config=CFG, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert len(curve) == 4 and all(x >= y for x, y in zip(curve, curve[1:])) and 0 < curve[-1] == count_active(a)
    total = sum(p.numel() for p in tiny_sd.unet.parameters())
    assert curve[0] == pytest.approx(0.3 * total, rel=0.02)  # one map keeps ~30 % of every tensor
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in tiny_sd.unet.named_parameters())
    check_mask(a, tiny_sd.unet)


def test_gradient_map_depends_on_seed_and_prompt(tiny_sd):
    g1, g1b = gradient_map(tiny_sd, "nudity", 0, CFG), gradient_map(tiny_sd, "nudity", 0, CFG)
    g2, g3 = gradient_map(tiny_sd, "nudity", 1, CFG), gradient_map(tiny_sd, "naked", 0, CFG)
    n = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(g1[n], g1b[n]) and not torch.equal(g1[n], g2[n]) and not torch.equal(g1[n], g3[n])
    assert set(g1) == {k for k, _ in tiny_sd.unet.named_parameters()}
    assert g1[n].abs().sum() > 0


def test_mask_file_round_trip_and_validation(tiny_sd, tmp_path):
    unet = tiny_sd.unet
    mask = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.5 for n, p in unet.named_parameters()}
    path = save_mask(mask, tmp_path / "m.safetensors", {"seeds": [1, 2]})
    back = load_mask(path, unet)
    assert all(torch.equal(back[n], mask[n]) for n in mask)
    name = next(iter(mask))
    with pytest.raises(ValueError, match="missing"): check_mask({k: v for k, v in mask.items() if k != name}, unet)
    with pytest.raises(ValueError, match="does not have"): check_mask({**mask, "extra.weight": mask[name]}, unet)
    with pytest.raises(ValueError, match="shape"): check_mask({**mask, name: mask[name].flatten()[:3]}, unet)
    with pytest.raises(ValueError, match="bool"): check_mask({**mask, name: mask[name].float()}, unet)
    with pytest.raises(FileNotFoundError, match="mask"): load_mask(tmp_path / "nope.safetensors")


def test_masked_updates_move_only_masked_weights(tiny_sd):
    unet = tiny_sd.unet
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in unet.named_parameters()}
    partial = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    full = "down_blocks.0.resnets.0.conv1.weight"
    mask[partial] = torch.rand(mask[partial].shape, generator=g) > 0.7
    mask[full][:] = True
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    params, grad_mask = masked_parameters(unet, mask=mask)
    assert sorted(params) == sorted([full, partial]) and list(grad_mask) == [partial]  # a full mask needs no multiply
    assert sum(p.requires_grad for p in unet.parameters()) == 2  # everything else frozen: no grads, no Adam state
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    z = torch.randn((1, *tiny_sd.latent_shape), generator=g)
    emb = torch.randn((1, 16, unet.config.cross_attention_dim), generator=g)
    for _ in range(2):
        opt.zero_grad()
        unet(z, 500, encoder_hidden_states=emb).sample.square().mean().backward()
        mask_gradients(params, grad_mask)
        opt.step()
    for n, p in unet.named_parameters():
        moved = p.detach() != before[n]
        assert torch.equal(moved & ~mask[n], torch.zeros_like(moved)), n  # nothing outside the mask moved
    assert (unet.get_parameter(partial).detach() != before[partial]).sum() > 0
    with pytest.raises(ValueError, match="no weight"):
        masked_parameters(unet, names=["conv_in.weight"], mask=mask)
