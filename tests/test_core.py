"""ant_nb.base.model and ant_nb.base.timesteps: loading, saving, prompts, noise and the timestep convention."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ant_nb.base.model import (DiffusionModel, encode_prompts, initial_noise, load_model, save_model,
                               seed_everything, with_unet)
from ant_nb.base.timesteps import paper_step_to_timestep, paper_timesteps
from ant_nb.base.sampling import sample


def test_load_and_sample_end_to_end(tiny_sd_dir):
    model = load_model(str(tiny_sd_dir))
    assert isinstance(model, DiffusionModel) and model.source == str(tiny_sd_dir)
    assert (model.device.type, model.dtype, model.latent_shape) == ("cpu", torch.float32, (4, 8, 8))
    assert model.vae is not None and not any(p.requires_grad for p in model.text_encoder.parameters())
    imgs = sample(model, ["a cat", "a dog"], [0, 1], num_steps=3, progress=False)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8


def test_save_model_loads_in_diffusers(tiny_sd, tmp_path):
    out = save_model(tiny_sd, tmp_path/"saved")
    index = json.loads((out/"model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe(["a cat"], num_inference_steps=2, height=16, width=16, output_type="np").images.shape == (1, 16, 16, 3)
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), tiny_sd.unet.state_dict().values()))
    again = load_model(out)
    assert torch.equal(encode_prompts(again, ["a cat"]), encode_prompts(tiny_sd, ["a cat"]))


def test_save_model_refuses_to_overwrite(tiny_sd, tmp_path):
    out = save_model(tiny_sd, tmp_path/"m")
    with pytest.raises(FileExistsError, match="overwrite=True"): save_model(tiny_sd, out)
    save_model(tiny_sd, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


def test_pixel_space_model_round_trip(tiny_sd, tmp_path):
    unet = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    sched = DDIMScheduler.from_config(tiny_sd.scheduler.config, clip_sample=True)  # as pixel-space models use
    pixel = dataclasses.replace(with_unet(tiny_sd, unet), vae=None, scheduler=sched)
    out = save_model(pixel, tmp_path/"pixel")
    assert json.loads((out/"model_index.json").read_text())["vae"] == [None, None]
    loaded = load_model(out)
    assert loaded.vae is None and loaded.latent_shape == (3, 16, 16)
    assert loaded.scheduler.config.clip_sample and pixel.scheduler.config.clip_sample  # saved as is, not rewritten
    imgs = sample(loaded, ["a cat"], [0], num_steps=2, progress=False)
    assert imgs.shape == (1, 16, 16, 3)


def test_with_unet_shares_other_parts(tiny_sd):
    other = with_unet(tiny_sd, UNet2DConditionModel.from_config(tiny_sd.unet.config))
    assert other.unet is not tiny_sd.unet and other.text_encoder is tiny_sd.text_encoder
    with pytest.raises(TypeError, match="torch.nn.Module"): with_unet(tiny_sd, "unet")


def test_toy_models_are_recorded_by_the_name_they_resolve_to():
    "Caches key on `model.source`: \"toy\" must not mean the same cache before and after the default changes."
    from ant_nb.base.registry import TOY_DEFAULT
    assert (load_model("toy").source, load_model("toy-v1").source) == (TOY_DEFAULT, "toy-v1")


def test_load_model_errors(tmp_path, monkeypatch):
    from ant_nb.base import registry
    monkeypatch.setitem(registry.TOY_MODELS, registry.TOY_DEFAULT, str(tmp_path/"toyworld"/"model")) # the one table of toy models
    with pytest.raises(FileNotFoundError, match="toy model .toy. is not at"): load_model("toy")
    with pytest.raises(FileNotFoundError, match="neither a toy model"): load_model("./missing/folder")
    with pytest.raises(FileNotFoundError, match="lacks the subfolders"): load_model(str(tmp_path))
    with pytest.raises(TypeError, match="source="): load_model(3)


def test_device_and_dtype(tiny_sd_dir):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"): load_model(str(tiny_sd_dir), device="cuda")
    with pytest.raises(ValueError, match="dtype='int8' is not allowed"): load_model(str(tiny_sd_dir), dtype="int8")
    bf16 = load_model(str(tiny_sd_dir), dtype=torch.bfloat16)
    assert bf16.dtype == bf16.text_encoder.dtype == bf16.vae.dtype == torch.bfloat16
    assert encode_prompts(bf16, ["a"]).dtype == initial_noise(bf16, [0]).dtype == torch.bfloat16


def test_encode_prompts(tiny_sd):
    e = encode_prompts(tiny_sd, ["a cat", "", "a very long prompt " * 10])
    assert e.shape == (3, tiny_sd.tokenizer.model_max_length, 32) and not e.requires_grad
    with pytest.raises(TypeError, match="single string"): encode_prompts(tiny_sd, "a cat")
    with pytest.raises(ValueError, match="prompts=\\[\\]"): encode_prompts(tiny_sd, [])


def test_initial_noise_one_generator_per_seed(tiny_sd):
    n = initial_noise(tiny_sd, [3, 4])
    expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(4))
    assert torch.equal(n[1], expected) and torch.equal(initial_noise(tiny_sd, [4])[0], expected)
    assert torch.equal(initial_noise(tiny_sd, [np.int64(2**32 + 5)]), initial_noise(tiny_sd, [2**32 + 5]))
    with pytest.raises(ValueError, match="seeds contains -1"): initial_noise(tiny_sd, [-1])
    seed_everything(11); a = (np.random.rand(), torch.rand(1)); seed_everything(11)
    assert a[0] == np.random.rand() and torch.equal(a[1], torch.rand(1))


@pytest.mark.parametrize("num_steps", [50, 10])
def test_timestep_convention_high_noise_side(tiny_sd, num_steps):
    sched = tiny_sd.scheduler
    ts = paper_timesteps(sched, num_steps)
    assert ts.dtype == torch.long and len(ts) == num_steps and bool((ts[:-1] > ts[1:]).all())  # sampling order
    steps = range(1, num_steps + 1)
    mapped = [paper_step_to_timestep(sched, t, num_steps) for t in steps]
    assert mapped == sorted(mapped) and mapped[-1] == ts[0] and mapped[0] == ts[-1]  # larger t, larger timestep
    abar = sched.alphas_cumprod[torch.tensor(mapped)]
    assert bool((abar[1:] < abar[:-1]).all())  # larger paper step = less signal = more noise
    t_prime = num_steps // 2
    early = paper_step_to_timestep(sched, t_prime + 1, num_steps)  # t > t': early, high-noise stage
    late = paper_step_to_timestep(sched, t_prime, num_steps)  # t <= t': mid-to-late stage
    assert early > late


def test_timestep_values_sd_schedule(tiny_sd):
    sched = tiny_sd.scheduler
    assert [paper_step_to_timestep(sched, t) for t in (50, 43, 1)] == [981, 841, 1]
    assert tiny_sd.scheduler.num_inference_steps is None  # the model's scheduler is left alone
    with pytest.raises(ValueError, match="t=0 is not allowed"): paper_step_to_timestep(sched, 0)
    with pytest.raises(ValueError, match="num_steps=0"): paper_timesteps(sched, 0)
