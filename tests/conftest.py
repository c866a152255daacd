"""Shared pytest fixtures: a tiny SD-format pipeline on disk and loaded (ε- and v-prediction), the shared prompt files,
and a plain diffusers sampling loop to compare the package's sampler with."""
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ant_nb.base.model import load_model, save_model
from ant_nb.base.testing import build_tiny_sd

torch.set_num_threads(1)  # tests run in parallel workers on few cores

SHARED_DATA = Path(__file__).resolve().parents[1].parent/"shared"/"data"

# Batched and per-prompt UNet calls sum in different orders (batch composition and thread count change float32
# summation), so their results differ by rounding. Measured on the tiny SD model (latents up to ~20 in magnitude) over
# 24 sampling runs (4 seed pairs x 3 t' x 1 and 2 threads): at most 5.5e-5 (tests/bench/float32_noise.py).
BATCH_ATOL = 2e-4


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    "Folder of a tiny randomly-initialised SD-format pipeline (diffusers layout), built once per session."
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd")/"tiny-sd")


@pytest.fixture
def tiny_sd(tiny_sd_dir):
    "A fresh `DiffusionModel` loaded from `tiny_sd_dir` on CPU (float32); safe to modify in a test."
    return load_model(str(tiny_sd_dir))


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tiny_sd_dir, tmp_path_factory) -> Path:
    "The tiny pipeline of `tiny_sd_dir` with its scheduler config switched to v-prediction (same weights), saved."
    model = load_model(str(tiny_sd_dir))
    v = DDIMScheduler.from_config(model.scheduler.config, prediction_type="v_prediction")
    return save_model(dataclasses.replace(model, scheduler=v), tmp_path_factory.mktemp("tiny_sd_v")/"tiny-sd-v")


@pytest.fixture
def tiny_sd_v(tiny_sd_v_dir):
    "A fresh `DiffusionModel` loaded from `tiny_sd_v_dir` (v-prediction) on CPU (float32)."
    return load_model(str(tiny_sd_v_dir))


@torch.no_grad()
def diffusers_loop(folder, prompts: list[str], seeds: list[int], num_steps: int, scale: float) -> dict:
    """{paper step t: z_t} for t = T..0 of a plain diffusers DDIM + CFG loop over the saved model in `folder`: its
    components and its scheduler config read with diffusers / transformers alone, start noise drawn per seed on the CPU."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    sched.set_timesteps(num_steps)
    embed = lambda p: text_encoder(tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,
                                       return_tensors="pt").input_ids).last_hidden_state
    cond, uncond = embed(prompts), embed([""] * len(prompts))
    c, size = unet.config.in_channels, unet.config.sample_size
    z = torch.stack([torch.randn((c, size, size), generator=torch.Generator().manual_seed(s)) for s in seeds])
    zs = {num_steps: z}
    for i, tau in enumerate(sched.timesteps):
        out_u, out_c = (unet(z, tau, encoder_hidden_states=e).sample for e in (uncond, cond))
        z = sched.step(out_u + scale * (out_c - out_u), tau, z).prev_sample
        zs[num_steps - i - 1] = z
    return zs


@pytest.fixture
def shared_data() -> Path:
    "The shared folder of real prompt files (`../shared/data` beside the checkout); skips the test if absent."
    if not SHARED_DATA.is_dir(): pytest.skip(f"real prompt files not found at {SHARED_DATA}")
    return SHARED_DATA
