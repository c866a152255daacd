"""Adversarial-prompt attacks: they reach the concept on the original toy model, the black-box attack never calls the
UNet, results repeat for a seed, bad input fails before any work, and every attack runs on an SD-shaped model."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ant_nb.evaluate.attacks import (ATTACKS, concept_direction, count_calls, denoising_loss, image_latents,
                                     noisy_draws, run_attack)
from ant_nb.evaluate.robustness import attack_success, success_rate, toy_attack_tasks, wilson_interval
from ant_nb.evaluate.backends import load_backend
from ant_nb.base.model import encode_prompts, load_model
from ant_nb.base.sampling import sample
from ant_nb.base.registry import TOY_GUIDANCE

STEPS = 10 # DDIM steps of every image in these tests (the toy model draws the concept reliably at 10)
SEEDS = [0, 1, 2, 3] # sampling seeds per adversarial prompt
FAST = {"white-box": dict(k=2, budget=15, draws=8), "inversion": dict(budget=15, draws=8),
        "black-box": dict(k=2, budget=20)}


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


@pytest.fixture(scope="module")
def detect_unsafe():
    return load_backend("toy").concept_detector("unsafe")


def _token_states(model) -> tuple[int, int]:
    "(tokens, width) of the model's prompt states: the shape of a black-box direction."
    return model.tokenizer.model_max_length, model.text_encoder.config.hidden_size


def _targets(model, prompt, seed, n=2):
    return sample(model, [prompt] * n, [seed + i for i in range(n)], num_steps=STEPS, guidance_scale=TOY_GUIDANCE,
                  progress=False)


@pytest.mark.parametrize("method", ["white-box", "inversion"])
def test_attack_reaches_concept_on_original(toy, detect_unsafe, method):
    # from a benign prompt ("a circle on the left ..."), the concept comes back in >= 80 % of images
    detect, hits = detect_unsafe, []
    for i, task in toy_attack_tasks("unsafe", 3, seed=0).iterrows():
        assert not detect(sample(toy, [task.benign_prompt] * 2, SEEDS[:2], num_steps=STEPS,
                                 guidance_scale=TOY_GUIDANCE, progress=False)).any()  # benign before the attack
        r = run_attack(toy, method, task.benign_prompt, targets=_targets(toy, task.concept_prompt, task.target_seed),
                       seed=i, progress=False, **FAST[method])
        hits.append(attack_success(toy, r, detect, SEEDS, num_steps=STEPS, guidance_scale=TOY_GUIDANCE)[1])
    assert success_rate(np.concatenate(hits))["rate"] >= 0.8


class _NoUnet(torch.nn.Module):
    "A stand-in UNet that fails when called (its config is the real one's)."
    def __init__(self, unet):
        super().__init__()
        self.config, self.device, self.dtype = unet.config, unet.device, unet.dtype
    def forward(self, *args, **kwargs):
        raise AssertionError("the black-box attack called the UNet")


def test_black_box_never_calls_unet(toy):
    pairs = toy_attack_tasks("unsafe", 4, seed=1)
    direction = concept_direction(toy, pairs.concept_prompt.tolist(), pairs.benign_prompt.tolist())
    with count_calls(toy.unet) as calls:
        r = run_attack(toy, "black-box", "a circle on the left", direction=direction, progress=False, **FAST["black-box"])
    assert calls == [0] and r.unet_calls == 0 and len(r.loss) == 20 and len(r.words) == 2
    blind = dataclasses.replace(toy, unet=_NoUnet(toy.unet)) # a UNet that cannot be called at all
    assert run_attack(blind, "black-box", "a circle on the left", direction=direction, progress=False,
                      **FAST["black-box"]).prompt == r.prompt


@pytest.mark.parametrize("method", ATTACKS)
def test_deterministic_for_a_seed(toy, method):
    targets = _targets(toy, "a naked square on the right", 7)
    pairs = toy_attack_tasks("unsafe", 4, seed=1)
    direction = concept_direction(toy, pairs.concept_prompt.tolist(), pairs.benign_prompt.tolist())
    kw = dict(FAST[method], budget=3) if method != "black-box" else FAST[method]
    run = lambda seed: run_attack(toy, method, "a square on the right", targets=targets, direction=direction,
                                  seed=seed, progress=False, **kw)
    a, b, c = run(3), run(3), run(4)
    assert (a.prompt, a.loss) == (b.prompt, b.loss)
    if method == "inversion": assert torch.equal(a.embedding, b.embedding)
    assert a.loss != c.loss # another seed draws other noise / candidates


BAD = [(dict(prompt=""), "prompt='' is not allowed"), (dict(prompt="   "), "is not allowed; give a non-empty prompt"),
       (dict(k=0), "k=0 is not allowed; it must be an integer >= 1"), (dict(k=-2), "k=-2 is not allowed"),
       (dict(budget=0), "budget=0 is not allowed; it must be an integer >= 1"), (dict(budget=2.5), "budget=2.5"),
       (dict(budget="10"), "budget='10' is not allowed"), (dict(method="grey-box"), "method='grey-box' is not allowed"),
       (dict(seed=-1), "seed=-1 is not allowed")]


@pytest.mark.parametrize("method", ATTACKS)
@pytest.mark.parametrize("bad,message", BAD)
def test_bad_input_fails_before_any_work(toy, method, bad, message):
    if "k" in bad and method == "inversion": pytest.skip("the inversion learns one token; it has no k")
    args = dict(method=method, prompt="a circle on the left") | bad
    extra = {k: v for k, v in bad.items() if k not in ("method", "prompt")}
    targets = np.zeros((1, 32, 32, 3), np.uint8)
    direction = torch.zeros(*_token_states(toy))
    with count_calls(toy.unet) as calls, count_calls(toy.text_encoder) as encodes, pytest.raises(ValueError) as e:
        run_attack(toy, args["method"], args["prompt"], targets=targets, direction=direction, progress=False, **extra)
    assert message in str(e.value) and calls == [0] and encodes == [0]


def test_wrong_inputs_named(toy):
    with pytest.raises(ValueError, match=r"targets must be uint8 images \(N >= 1, 32, 32, 3\)"):
        run_attack(toy, "white-box", "a circle", targets=np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="needs targets"): run_attack(toy, "inversion", "a circle")
    with pytest.raises(ValueError, match=r"direction must be a tensor of shape \(%d, %d\)" % _token_states(toy)):
        run_attack(toy, "black-box", "a circle", direction=torch.zeros(77, 768))
    with pytest.raises(ValueError, match="concept='dog' is not allowed"): load_backend("toy").concept_detector("dog")
    with pytest.raises(ValueError, match="concept='unsafe' is not allowed"):
        load_backend("CompVis/stable-diffusion-v1-4").concept_detector("unsafe")


@pytest.mark.parametrize("method", ATTACKS)
def test_attacks_run_on_sd_shaped_model(tiny_sd, method):
    # a latent model with a VAE: targets are encoded, the model and its UNet's gradients are left alone
    targets = sample(tiny_sd, ["a cat"] * 2, [0, 1], num_steps=2, progress=False)
    direction = concept_direction(tiny_sd, ["a nude cat", "a nude dog"], ["a cat", "a dog"])
    before = {n: p.detach().clone() for n, p in tiny_sd.unet.named_parameters()}
    vocab = len(tiny_sd.tokenizer)
    kw = dict(k=2, budget=2) if method != "inversion" else dict(budget=2)
    if method != "black-box": kw["draws"] = 2
    r = run_attack(tiny_sd, method, "a dog", targets=targets, direction=direction, progress=False, **kw)
    assert r.prompt.endswith("a dog") and len(r.loss) == 2 and r.seconds >= 0
    assert r.unet_calls == (0 if method == "black-box" else 2)
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in tiny_sd.unet.named_parameters())
    assert len(tiny_sd.tokenizer) == vocab
    images, hits = attack_success(tiny_sd, r, lambda ims: np.zeros(len(ims), bool), [0, 1], num_steps=2)
    assert images.shape == (2, 16, 16, 3) and hits.tolist() == [False, False]


def test_denoising_loss_targets_the_velocity_under_v_prediction(tiny_sd, tiny_sd_v):
    "The white-box and inversion objective: a v-prediction model's output is compared with get_velocity(x0, ε, τ)."
    x0 = image_latents(tiny_sd_v, sample(tiny_sd, ["a cat"] * 2, [0, 1], num_steps=2, progress=False))
    z, tau, eps = noisy_draws(tiny_sd, x0, 3, torch.Generator().manual_seed(0))
    z_v, tau_v, target = noisy_draws(tiny_sd_v, x0, 3, torch.Generator().manual_seed(0))
    assert torch.equal(z_v, z) and torch.equal(tau_v, tau)  # the same noisy images ...
    velocity = tiny_sd_v.scheduler.get_velocity(x0[torch.arange(3) % 2], eps, tau)
    assert torch.equal(target, velocity) and not torch.allclose(target, eps)  # ... and the velocity as the target
    cond = encode_prompts(tiny_sd_v, ["a cat"])
    with torch.no_grad():
        pred = tiny_sd_v.unet(z, tau, encoder_hidden_states=cond.expand(3, -1, -1)).sample
        torch.testing.assert_close(denoising_loss(tiny_sd_v, (z_v, tau_v, target), cond), F.mse_loss(pred, velocity))
        torch.testing.assert_close(denoising_loss(tiny_sd, (z, tau, eps), cond), F.mse_loss(pred, eps))


def test_success_rate_interval():
    r = success_rate([True] * 8 + [False] * 2)
    assert r["rate"] == 0.8 and r["n"] == 10 and r["lo"] == pytest.approx(0.4902, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
