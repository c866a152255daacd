"""Tests of ant_nb.method.losses on the tiny SD-format UNet: each term of Eq. 3, its targets, stage ordering, baselines."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ant_nb.base.model import encode_prompts
from ant_nb.base.timesteps import paper_timesteps
from ant_nb.method.losses import (ABLATIONS, AntLossConfig, METHODS, TERMS, ablation_config, ac_loss, ant_loss,
                                  draw_steps, esd_loss, paper_config, stage_ranges, trainable_names)
from ant_nb.method.trajectories import TrajectoryLatents, method_loss, trajectories_from_file
from ant_nb.base.sampling import guide, trajectory

from conftest import BATCH_ATOL, diffusers_loop

T = 10  # a short schedule keeps trajectories cheap


@pytest.fixture
def setup(tiny_sd):
    "Frozen UNet, a perturbed trainable copy, latents at two steps, embeddings."
    frozen = tiny_sd.unet.requires_grad_(False)
    trained = copy.deepcopy(frozen).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters(): p.add_(0.02 * torch.randn(p.shape, generator=g))
    z1, z2 = torch.randn((2, 2, *tiny_sd.latent_shape), generator=g)
    ts = paper_timesteps(tiny_sd.scheduler, T)
    cond = encode_prompts(tiny_sd, ["nudity", "naked"])
    uncond = encode_prompts(tiny_sd, [""])
    return dict(model=tiny_sd, frozen=frozen, trained=trained, z1=z1, z2=z2, t1=ts[T - torch.tensor([9, 10])],
                t2=ts[T - torch.tensor([2, 5])], cond=cond, uncond=uncond)


def _eps(unet, z, t, emb):
    with torch.no_grad(): return unet(z, t, encoder_hidden_states=emb.expand(z.shape[0], -1, -1)).sample


def _grads(s, config):
    "Gradient of the ANT loss w.r.t. every trained parameter, flattened."
    s["trained"].zero_grad()
    loss, parts = ant_loss(s["trained"], s["frozen"], s["z1"], s["z2"], s["t1"], s["t2"], s["cond"], s["uncond"], config,
                           scheduler=s["model"].scheduler)
    loss.backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in s["trained"].parameters()]), parts


def _close(a, b, rel=1e-4):
    "Equal up to `rel` of the largest entry (batching changes float rounding)."
    assert (a - b).abs().max() <= rel * max(a.abs().max(), b.abs().max())


def test_targets_match_hand_computed(setup):
    s, eta = setup, 0.7
    cfg = AntLossConfig(eta=eta, lambda1=0.3, lambda2=0.2, lambda3=0.1, num_steps=T, t_prime=8)
    loss, parts = ant_loss(s["trained"], s["frozen"], s["z1"], s["z2"], s["t1"], s["t2"], s["cond"], s["uncond"], cfg,
                           scheduler=s["model"].scheduler)
    fu1, fc1 = _eps(s["frozen"], s["z1"], s["t1"], s["uncond"]), _eps(s["frozen"], s["z1"], s["t1"], s["cond"])
    fu2, fc2 = _eps(s["frozen"], s["z2"], s["t2"], s["uncond"]), _eps(s["frozen"], s["z2"], s["t2"], s["cond"])
    pu1, pc1 = _eps(s["trained"], s["z1"], s["t1"], s["uncond"]), _eps(s["trained"], s["z1"], s["t1"], s["cond"])
    pu2, pc2 = _eps(s["trained"], s["z2"], s["t2"], s["uncond"]), _eps(s["trained"], s["z2"], s["t2"], s["cond"])
    want = dict(preserve=F.mse_loss(pc1, fu1 + eta * (fc1 - fu1)), erase=F.mse_loss(pc2, fu2 - eta * (fc2 - fu2)),
                uncond_early=F.mse_loss(pu1, fu1), uncond_late=F.mse_loss(pu2, fu2))
    for k in TERMS: torch.testing.assert_close(parts[k], want[k], rtol=1e-4, atol=1e-7)
    total = want["preserve"] + 0.3 * want["erase"] + 0.2 * want["uncond_early"] + 0.1 * want["uncond_late"]
    torch.testing.assert_close(loss.detach(), total, rtol=1e-4, atol=1e-7)


def test_each_term_has_gradient_only_when_on(setup):
    cfg = AntLossConfig(num_steps=T, t_prime=8, lambda1=1.0, lambda2=0.5, lambda3=0.25)
    single = {k: _grads(setup, AntLossConfig(**{**cfg.__dict__, "terms": (k,)}))[0] for k in TERMS}
    for k, g in single.items(): assert g.abs().sum() > 0, f"{k} has no gradient when on"
    for off in TERMS:  # switching one term off removes exactly its contribution
        rest = tuple(k for k in TERMS if k != off)
        g, parts = _grads(setup, AntLossConfig(**{**cfg.__dict__, "terms": rest}))
        assert off not in parts
        _close(g, sum(single[k] for k in rest))  # the (weighted) terms add up


def test_zero_weight_and_uncond_grad_off_give_no_gradient(setup):
    base = dict(num_steps=T, t_prime=8)
    g_erase = _grads(setup, AntLossConfig(**base, terms=("erase",)))[0]
    g_off, parts = _grads(setup, AntLossConfig(**base, uncond_grad=False))  # authors' script: uncond under no_grad
    assert parts["uncond_early"] > 0 and parts["uncond_late"] > 0  # the terms are in the loss value ...
    g_pe = _grads(setup, AntLossConfig(**base, terms=("preserve", "erase")))[0]
    _close(g_off, g_pe)  # ... but add no gradient
    g0 = _grads(setup, AntLossConfig(**base, lambda2=0.0, lambda3=0.0, terms=("erase", "uncond_early", "uncond_late")))[0]
    _close(g0, g_erase)


def test_terms_read_their_own_stage(setup):
    "Preserve / uncond-early see only z_t1; erase / uncond-late see only z_t2."
    s = setup
    def value(term, z1, z2):
        cfg = AntLossConfig(num_steps=T, t_prime=8, terms=(term,))
        with torch.no_grad():
            return ant_loss(s["trained"], s["frozen"], z1, z2, s["t1"], s["t2"], s["cond"], s["uncond"], cfg,
                            scheduler=s["model"].scheduler)[0]
    other = torch.randn_like(s["z1"])
    for term, stage in [("preserve", 1), ("uncond_early", 1), ("erase", 2), ("uncond_late", 2)]:
        base = value(term, s["z1"], s["z2"])
        same = value(term, s["z1"], other) if stage == 1 else value(term, other, s["z2"])
        changed = value(term, other, s["z2"]) if stage == 1 else value(term, s["z1"], other)
        assert base == same and base != changed, term


def test_at_original_weights_only_erase_is_nonzero(setup):
    s = setup
    _, parts = ant_loss(s["frozen"], s["frozen"], s["z1"], s["z2"], s["t1"], s["t2"], s["cond"], s["uncond"],
                        AntLossConfig(num_steps=T, t_prime=8), scheduler=s["model"].scheduler)
    assert parts["erase"] > 0
    for k in ("preserve", "uncond_early", "uncond_late"): assert parts[k].abs() < 1e-10, k


def test_stage_order_and_step_draws():
    g = torch.Generator().manual_seed(1)
    for cfg, pre, era in [(AntLossConfig(), (44, 50), (1, 43)),
                          (AntLossConfig(stage_order="official-single"), (1, 7), (8, 50)),
                          (AntLossConfig(t_prime=40, erase_all_steps=True), (41, 50), (1, 50)),
                          (paper_config("art"), (48, 50), (1, 47))]:
        assert stage_ranges(cfg) == dict(preserve=pre, erase=era)
        t1, t2 = draw_steps(cfg, 4000, g)
        assert (t1.min().item(), t1.max().item()) == pre and (t2.min().item(), t2.max().item()) == era
    # same generator state, same draws (exact resume depends on it)
    a = draw_steps(AntLossConfig(), 5, torch.Generator().manual_seed(3))
    b = draw_steps(AntLossConfig(), 5, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_presets_and_ablations():
    assert [paper_config(k).t_prime for k in ("nudity", "celebrity", "art")] == [43, 40, 47]
    assert (paper_config("celebrity").lambda1, paper_config("celebrity").lambda3) == (0.4, 0.2)
    assert set(ABLATIONS) == {"A", "B", "C", "D", "E", "ours"}
    assert ablation_config("B").erase_all_steps and ablation_config("B").terms == ("erase", "uncond_early", "uncond_late")
    assert ablation_config("E", paper_config("art")).t_prime == 47


@pytest.mark.parametrize("kwargs,name", [
    (dict(t_prime=50), "t_prime"), (dict(t_prime=0), "t_prime"), (dict(t_prime=-3), "t_prime"),
    (dict(lambda1=-0.1), "lambda1"), (dict(lambda3=float("nan")), "lambda3"), (dict(eta=-1.0), "eta"),
    (dict(stage_order="reversed"), "stage_order"), (dict(terms=()), "terms"), (dict(terms=("erase", "erase")), "terms"),
    (dict(terms=("forget",)), "terms"), (dict(terms=("uncond_late",), uncond_grad=False), "terms"),
    (dict(num_steps=1), "num_steps")])
def test_bad_config_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name): AntLossConfig(**kwargs)


def test_bad_preset_names_the_parameter():
    with pytest.raises(ValueError, match="kind"): paper_config("violence")
    with pytest.raises(ValueError, match="name"): ablation_config("F")
    with pytest.raises(TypeError, match="t_prime"): AntLossConfig(t_prime=43.5)


def test_baseline_targets(setup):
    s = setup
    loss, _ = esd_loss(s["trained"], s["frozen"], s["z1"], s["t1"], s["cond"], s["uncond"], eta=2.0)
    fu, fc = _eps(s["frozen"], s["z1"], s["t1"], s["uncond"]), _eps(s["frozen"], s["z1"], s["t1"], s["cond"])
    torch.testing.assert_close(loss.detach(), F.mse_loss(_eps(s["trained"], s["z1"], s["t1"], s["cond"]),
                                                         fu - 2.0 * (fc - fu)), rtol=1e-4, atol=1e-7)
    anchor = encode_prompts(s["model"], ["a person", "a dog"])
    loss, _ = ac_loss(s["trained"], s["frozen"], s["z1"], s["t1"], s["cond"], anchor)
    torch.testing.assert_close(loss.detach(), F.mse_loss(_eps(s["trained"], s["z1"], s["t1"], s["cond"]),
                                                         _eps(s["frozen"], s["z1"], s["t1"], anchor)), rtol=1e-4, atol=1e-7)


def test_parameter_sets(tiny_sd):
    names = {m: set(trainable_names(tiny_sd.unet, m)) for m in METHODS}
    assert names["ant"] == {n for n, _ in tiny_sd.unet.named_parameters()}
    assert names["esd-x"] and all("attn2." in n for n in names["esd-x"])
    assert names["esd-u"] and not names["esd-u"] & names["esd-x"]
    assert not any(n.startswith(("time_embedding.", "conv_out.")) for n in names["esd-u"])
    assert names["ac"] and names["ac"] <= names["esd-x"] and all(".to_k." in n or ".to_v." in n for n in names["ac"])
    with pytest.raises(ValueError, match="method"): trainable_names(tiny_sd.unet, "esd")


def test_cached_latents_are_the_frozen_trajectories(tiny_sd):
    lat = TrajectoryLatents(tiny_sd, ["nudity", "naked"], cache_size=3, num_steps=T, seed=5, progress=False)
    assert lat.latents.shape == (3, T, *tiny_sd.latent_shape)
    noise = torch.randn((3, *tiny_sd.latent_shape), generator=torch.Generator().manual_seed(5))
    ref = trajectory(tiny_sd, lat.embeds[lat.prompt_index(torch.arange(3))], noise, [T, 4, 1], num_steps=T,
                     guidance_scale=3.0, uncond_embeds=lat.uncond)
    for t in (T, 4, 1): torch.testing.assert_close(lat.latents[:, t - 1], ref[t])
    torch.testing.assert_close(lat.latents[:, T - 1], noise)  # z_T is the start code
    idx, (a, b), eps = lat.draw([torch.tensor([T, 3]), torch.tensor([1, 2])], torch.Generator().manual_seed(0))
    assert a.shape == (2, *tiny_sd.latent_shape) and idx.shape == (2,) and len(eps) == 2


def test_trajectories_of_a_v_model_follow_its_diffusers_loop(tiny_sd, tiny_sd_v, tiny_sd_v_dir):
    "The cached z_t of a v-prediction model are those of a plain diffusers loop over its saved config, not the ε ones."
    lat = TrajectoryLatents(tiny_sd_v, ["nudity"], cache_size=1, num_steps=T, seed=5, progress=False)
    loop = diffusers_loop(tiny_sd_v_dir, ["nudity"], [5], T, 3.0)  # K = 1: the start code is seed 5's
    for t in range(1, T + 1): torch.testing.assert_close(lat.latents[:, t - 1], loop[t], rtol=1e-4, atol=BATCH_ATOL)
    eps_lat = TrajectoryLatents(tiny_sd, ["nudity"], cache_size=1, num_steps=T, seed=5, progress=False)
    assert not torch.allclose(lat.latents[:, 0], eps_lat.latents[:, 0])


def test_ant_targets_from_v_are_the_v_of_the_targets_from_eps(tiny_sd_v):
    "Every target is an affine combination with weights summing to 1, so it commutes with the ε ↔ v conversion."
    g = torch.Generator().manual_seed(0)
    z, v_u, v_c = torch.randn((3, 2, *tiny_sd_v.latent_shape), generator=g)
    tau = paper_timesteps(tiny_sd_v.scheduler, T)[[0, T - 1]]  # the noisiest and the cleanest step
    a = tiny_sd_v.scheduler.alphas_cumprod[tau].view(-1, 1, 1, 1)
    to_eps = lambda v: a.sqrt() * v + (1 - a).sqrt() * z  # as scheduler.step recovers ε from v
    to_v = lambda e: (e - (1 - a).sqrt() * z) / a.sqrt()
    for eta, sign in ((1.0, 1), (1.0, -1), (0.5, -1), (2.0, 1)):
        torch.testing.assert_close(to_v(guide(to_eps(v_u), to_eps(v_c), eta, sign < 0)), guide(v_u, v_c, eta, sign < 0),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache_size", [3, 0])
def test_recorded_eps_are_the_frozen_predictions(tiny_sd, cache_size):
    "The predictions served with the latents equal a direct frozen UNet call at those latents, steps and prompts."
    lat = TrajectoryLatents(tiny_sd, ["nudity", "naked"], cache_size=cache_size, num_steps=T, seed=5, progress=False)
    steps = [torch.tensor([T, 3]), torch.tensor([1, 2])]
    idx, zs, eps = lat.draw(steps, torch.Generator().manual_seed(0))
    for s, z, (eps_u, eps_c) in zip(steps, zs, eps):
        ts = lat.timesteps[T - s]
        with torch.no_grad():
            u = tiny_sd.unet(z, ts, encoder_hidden_states=lat.uncond.expand(2, -1, -1)).sample
            c = tiny_sd.unet(z, ts, encoder_hidden_states=lat.embeds[idx]).sample
        torch.testing.assert_close(eps_u, u, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(eps_c, c, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["ant", "esd-x", "ac"])
def test_method_loss_with_recorded_eps_equals_frozen_calls(tiny_sd, method):
    "Reusing the trajectories' predictions changes no loss value and removes the frozen UNet call."
    cfg = AntLossConfig(num_steps=T, t_prime=8)
    prompts = ["a person"] if method == "ac" else ["nudity", "naked"]
    trained = copy.deepcopy(tiny_sd.unet)
    with torch.no_grad():
        for p in trained.parameters(): p.add_(0.01 * torch.randn_like(p))
    cond, uncond = encode_prompts(tiny_sd, ["nudity", "naked"]), encode_prompts(tiny_sd, [""])
    anchor = encode_prompts(tiny_sd, prompts)
    calls = []
    hook = tiny_sd.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        values = []
        for record in (True, False):
            lat = TrajectoryLatents(tiny_sd, prompts, cache_size=2, num_steps=T, progress=False, record_eps=record)
            lat.latents
            calls.clear()
            values.append(method_loss(method, trained, tiny_sd.unet, lat, cond, uncond, cfg,
                                      torch.Generator().manual_seed(1), n=2, anchor=anchor)[0])
            assert len(calls) == (0 if record else 1)
    finally:
        hook.remove()
    torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=1e-4)


def test_saved_cache_round_trip(tiny_sd, tmp_path):
    "A cache written by `trajectories_from_file` is read back as the same latents and predictions; shapes are checked."
    from safetensors.torch import save_file
    written = trajectories_from_file(tmp_path/"f.safetensors", tiny_sd, ["nudity"], cache_size=2, num_steps=T)
    read = trajectories_from_file(tmp_path/"f.safetensors", tiny_sd, ["nudity"], cache_size=2, num_steps=T)
    torch.testing.assert_close(read.latents, written.latents)
    torch.testing.assert_close(read.eps, written.eps)
    save_file({"latents": written.latents.contiguous()}, tmp_path/"old.safetensors")  # files from before `eps` was kept
    assert trajectories_from_file(tmp_path/"old.safetensors", tiny_sd, ["nudity"], cache_size=2, num_steps=T).eps is None
    with pytest.raises(ValueError, match="expected"):
        trajectories_from_file(tmp_path/"f.safetensors", tiny_sd, ["nudity"], cache_size=3, num_steps=T)

def test_fresh_latents_and_method_loss(tiny_sd):
    cfg = AntLossConfig(num_steps=T, t_prime=8)
    fresh = TrajectoryLatents(tiny_sd, ["nudity"], cache_size=0, num_steps=T)
    assert fresh.latents is None
    cond, uncond = encode_prompts(tiny_sd, fresh.prompts), encode_prompts(tiny_sd, [""])
    losses = [method_loss("ant", tiny_sd.unet, tiny_sd.unet, fresh, cond, uncond, cfg, torch.Generator().manual_seed(2),
                          n=2)[1]["erase"] for _ in range(2)]
    assert losses[0] == losses[1] > 0  # same generator seed, same draw
    with pytest.raises(ValueError, match="anchor"):
        method_loss("ac", tiny_sd.unet, tiny_sd.unet, fresh, cond, uncond, cfg, torch.Generator())
    with pytest.raises(ValueError, match="num_steps"):
        method_loss("esd-u", tiny_sd.unet, tiny_sd.unet, fresh, cond, uncond, AntLossConfig(), torch.Generator())
    with pytest.raises(ValueError, match="cache_size"): TrajectoryLatents(tiny_sd, ["nudity"], cache_size=-1)
    with pytest.raises(ValueError, match="prompts"): TrajectoryLatents(tiny_sd, ["nudity", "nudity"])
