"""ant_nb.base.sampling: Eq. 1-2 guidance, the DDIM sampler, trajectories, decoding and grids."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from ant_nb.base.model import encode_prompts, initial_noise
from ant_nb.base.sampling import condition_sign, decode, guide, image_grid, sample, trajectory

from conftest import BATCH_ATOL, diffusers_loop


@torch.no_grad()
def reference_run(model, prompts, seeds, num_steps, scale, t_prime=None):
    "A hand-written DDIM + CFG loop with the reversal of Eq. 1-2; returns {paper step t: z_t} for t = T..0."
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(num_steps)
    cond, uncond = encode_prompts(model, prompts), encode_prompts(model, [""] * len(prompts))
    z = initial_noise(model, seeds)
    zs = {num_steps: z}
    for i, tau in enumerate(sched.timesteps):
        t = num_steps - i  # paper step of this iteration: T, T-1, ..., 1
        eps_u = model.unet(z, tau, encoder_hidden_states=uncond).sample
        eps_c = model.unet(z, tau, encoder_hidden_states=cond).sample
        sgn = -1.0 if t_prime is not None and t <= t_prime else 1.0
        z = sched.step(eps_u + scale * sgn * (eps_c - eps_u), tau, z).prev_sample
        zs[t - 1] = z
    return zs


def test_guide_hand_computed():
    eu, ec = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.5, 1.0]])
    assert torch.equal(guide(eu, ec, 3.0), torch.tensor([[3.5, 5.0]]))  # 0.5 + 3·1, -1 + 3·2
    assert torch.equal(guide(eu, ec, 3.0, reverse=True), torch.tensor([[-2.5, -7.0]]))  # 0.5 - 3·1, -1 - 3·2
    assert torch.equal(guide(eu, ec, 0.0), eu)
    scale = torch.tensor([1.0, 2.0]).view(2, 1)
    assert torch.equal(guide(eu.expand(2, 2), ec.expand(2, 2), scale), torch.tensor([[1.5, 1.0], [2.5, 3.0]]))


def test_condition_sign_eq2():
    assert [condition_sign(t, 43) for t in (50, 44, 43, 42, 1)] == [1, 1, -1, -1, -1]
    assert {condition_sign(t, None) for t in range(1, 51)} == {1}


def test_plain_cfg_matches_diffusers_pipeline(tiny_sd, tiny_sd_dir):
    ours = sample(tiny_sd, ["a red cat"], [42], num_steps=5, guidance_scale=6.0, progress=False, output_type="latent")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    theirs = pipe(["a red cat"], num_inference_steps=5, guidance_scale=6.0, height=16, width=16, output_type="latent",
                  latents=initial_noise(tiny_sd, [42])).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=BATCH_ATOL)


def test_v_prediction_matches_plain_diffusers_loop_and_pipeline(tiny_sd, tiny_sd_v, tiny_sd_v_dir):
    "A v-prediction model (the tiny model with its config switched) samples as diffusers does from the saved config."
    assert tiny_sd_v.scheduler.config.prediction_type == "v_prediction"
    prompts, seeds = ["a red cat", "a dog"], [42, 7]
    ours = sample(tiny_sd_v, prompts, seeds, num_steps=5, guidance_scale=6.0, progress=False, output_type="latent")
    loop = diffusers_loop(tiny_sd_v_dir, prompts, seeds, 5, 6.0)
    torch.testing.assert_close(ours, loop[0], rtol=1e-4, atol=BATCH_ATOL)
    zs = trajectory(tiny_sd_v, encode_prompts(tiny_sd_v, prompts), initial_noise(tiny_sd_v, seeds), [4, 2],
                    num_steps=5, guidance_scale=6.0)
    for t in (4, 2): torch.testing.assert_close(zs[t], loop[t], rtol=1e-4, atol=BATCH_ATOL)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_v_dir)
    theirs = pipe(prompts, num_inference_steps=5, guidance_scale=6.0, height=16, width=16, output_type="np",
                  latents=initial_noise(tiny_sd_v, seeds)).images
    images = sample(tiny_sd_v, prompts, seeds, num_steps=5, guidance_scale=6.0, progress=False)
    assert np.abs(images.astype(int) - (theirs * 255).round().astype(int)).max() <= 1
    eps_images = sample(tiny_sd, prompts, seeds, num_steps=5, guidance_scale=6.0, progress=False)
    assert not np.array_equal(images, eps_images)  # same weights: the prediction type is read from the config


def test_t_prime_none_equals_plain_cfg(tiny_sd):
    ref = reference_run(tiny_sd, ["a cat", "a dog"], [1, 2], 6, 7.5)
    z0 = sample(tiny_sd, ["a cat", "a dog"], [1, 2], num_steps=6, guidance_scale=7.5, progress=False, output_type="latent")
    torch.testing.assert_close(z0, ref[0], rtol=1e-4, atol=BATCH_ATOL)
    same = sample(tiny_sd, ["a cat", "a dog"], [1, 2], num_steps=6, t_prime=0, progress=False, output_type="latent")
    assert torch.equal(same, z0)


@pytest.mark.parametrize("t_prime", [3, 6])
def test_t_prime_equals_hand_written_reversal(tiny_sd, t_prime):
    ref = reference_run(tiny_sd, ["a cat", "a dog"], [1, 2], 6, 7.5, t_prime=t_prime)
    z0 = sample(tiny_sd, ["a cat", "a dog"], [1, 2], num_steps=6, guidance_scale=7.5, t_prime=t_prime,
                        progress=False, output_type="latent")
    torch.testing.assert_close(z0, ref[0], rtol=1e-4, atol=BATCH_ATOL)
    plain = reference_run(tiny_sd, ["a cat", "a dog"], [1, 2], 6, 7.5)
    for t in range(t_prime, 7):  # the steps t > t' are unchanged, so z_t for t >= t' is identical
        torch.testing.assert_close(ref[t], plain[t])
    assert not torch.allclose(ref[0], plain[0])


def test_sample_images_batches_and_scales(tiny_sd):
    prompts, seeds, scales = ["a cat", "a dog", "a cow"], [5, 6, 7], [1.0, 7.5, 3.0]
    imgs = sample(tiny_sd, prompts, seeds, num_steps=3, guidance_scale=scales, batch_size=2, progress=False)
    assert imgs.shape == (3, 16, 16, 3) and imgs.dtype == np.uint8
    for i in range(3):
        alone = sample(tiny_sd, [prompts[i]], [seeds[i]], num_steps=3, guidance_scale=scales[i], progress=False)
        assert np.abs(alone[0].astype(int) - imgs[i].astype(int)).max() <= 1
    z0 = sample(tiny_sd, prompts, seeds, num_steps=3, guidance_scale=scales, batch_size=2, progress=False, output_type="latent")
    assert np.array_equal(decode(tiny_sd, z0), imgs)


def test_sample_validates_before_work(tiny_sd):
    with pytest.raises(ValueError, match="one seed per prompt"): sample(tiny_sd, ["a", "b"], [1])
    with pytest.raises(ValueError, match="t_prime=51"): sample(tiny_sd, ["a"], [1], t_prime=51)
    with pytest.raises(ValueError, match="batch_size=0"): sample(tiny_sd, ["a"], [1], batch_size=0)
    with pytest.raises(ValueError, match="guidance_scale has 2 values"): sample(tiny_sd, ["a"], [1], guidance_scale=[1, 2])
    with pytest.raises(TypeError, match="DiffusionModel"): sample("toy", ["a"], [1])


def test_trajectory_equals_full_run(tiny_sd):
    ref = reference_run(tiny_sd, ["a cat", "a dog"], [1, 2], 6, 3.0)
    emb, noise = encode_prompts(tiny_sd, ["a cat", "a dog"]), initial_noise(tiny_sd, [1, 2])
    zs = trajectory(tiny_sd, emb, noise, [6, 4, 2, 0], num_steps=6)
    assert sorted(zs) == [0, 2, 4, 6]
    for t in zs: torch.testing.assert_close(zs[t], ref[t], rtol=1e-4, atol=BATCH_ATOL)
    full = sample(tiny_sd, ["a cat", "a dog"], [1, 2], num_steps=6, guidance_scale=3.0, progress=False, output_type="latent")
    torch.testing.assert_close(zs[0], full, rtol=1e-5, atol=1e-6)


def test_trajectory_stops_early_and_has_no_grad(tiny_sd):
    calls = []
    tiny_sd.unet.register_forward_hook(lambda *a: calls.append(1))
    emb, noise = encode_prompts(tiny_sd, ["a cat"]), initial_noise(tiny_sd, [0])
    uncond = encode_prompts(tiny_sd, [""])
    zs = trajectory(tiny_sd, emb, noise, [8], num_steps=10, uncond_embeds=uncond)
    assert len(calls) == 2 and not zs[8].requires_grad  # steps t = 10 and 9 only
    assert any(p.requires_grad for p in tiny_sd.unet.parameters())
    with pytest.raises(ValueError, match="record_steps=11"): trajectory(tiny_sd, emb, noise, [11], num_steps=10)
    with pytest.raises(ValueError, match="same N"): trajectory(tiny_sd, emb, initial_noise(tiny_sd, [0, 1]), [1])


def test_decode_pixel_space(tiny_sd):
    pixel = dataclasses.replace(tiny_sd, vae=None)
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    imgs = decode(pixel, x)
    assert imgs.shape == (2, 2, 2, 3) and imgs[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    with pytest.raises(ValueError, match="RGB"): decode(pixel, torch.zeros(1, 4, 2, 2))


def test_image_grid():
    imgs = np.zeros((5, 8, 8, 3), np.uint8)
    g = image_grid(imgs, nrow=3, pad=1)
    assert isinstance(g, Image.Image) and g.size == (3 * 9 + 1, 2 * 9 + 1)
    g = image_grid([Image.fromarray(im) for im in imgs], nrow=5, labels=list("abcde"), scale=4)
    assert g.size == (5 * 34 + 2, 32 + 12 + 4)
    assert np.asarray(g)[2 + 32:, :, :].min() < 255  # label text is drawn below the images
    with pytest.raises(ValueError, match="one label per image"): image_grid(imgs, nrow=2, labels=["a"])
