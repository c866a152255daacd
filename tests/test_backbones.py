"""SDXL and SD3 (flow matching) through the package: loading, the sampler against the diffusers pipelines' own images,
Eq. 1-2 on both, Eq. 3 in velocity space, and single-concept erasure that round-trips through the plain pipelines."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from ant_nb.base.backbones import Conditioning, text_kv_projections
from ant_nb.base.model import encode_prompts, initial_noise, load_model, save_model
from ant_nb.base.sampling import sample, trajectory
from ant_nb.base.testing import build_tiny_sd3, build_tiny_sdxl
from ant_nb.base.timesteps import paper_timesteps

PROMPTS, SEEDS = ["a red cat", "a dog on the left"], [3, 4]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("xl")/"tiny-sdxl")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3")/"tiny-sd3")


@pytest.fixture(scope="module")
def sd3_clip_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3c")/"tiny-sd3-clip", t5=False)


def _pipeline(folder, kind: str):
    """The plain diffusers pipeline of `folder`; SDXL with DDIM on its own noise schedule (the package's sampler); an
    SD3 folder without T5 needs `text_encoder_3=None` (diffusers' way of dropping T5)."""
    if kind == "sd3-clip": return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    if kind == "sd3": return StableDiffusion3Pipeline.from_pretrained(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _pipeline_images(pipe, prompts, seeds, steps, scale, output_type="np"):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=scale, generator=gens, output_type=output_type).images


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "sd3-clip"])
def test_sampler_equals_the_pipeline(kind, sdxl_dir, sd3_dir, sd3_clip_dir):
    "t' = None: the package's latents and images equal the diffusers pipeline's own (same seeds, steps, scale)."
    folder = {"sdxl": sdxl_dir, "sd3": sd3_dir, "sd3-clip": sd3_clip_dir}[kind]
    model, pipe = load_model(str(folder)), _pipeline(folder, kind)
    ours = sample(model, PROMPTS, SEEDS, num_steps=4, guidance_scale=5.0, progress=False, output_type="latent")
    theirs = _pipeline_images(pipe, PROMPTS, SEEDS, 4, 5.0, output_type="latent")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    imgs = sample(model, PROMPTS, SEEDS, num_steps=4, guidance_scale=5.0, progress=False)
    ref = np.round(_pipeline_images(pipe, PROMPTS, SEEDS, 4, 5.0) * 255)
    assert np.abs(imgs.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_reversed_guidance(kind, sdxl_dir, sd3_dir):
    "Eq. 1-2 on both: t' = 0 is plain CFG; reversing the last steps changes z_0; t' = T equals CFG at scale -s by hand."
    model = load_model(str(sdxl_dir if kind == "sdxl" else sd3_dir))
    kw = dict(num_steps=4, guidance_scale=5.0, progress=False, output_type="latent")
    plain = sample(model, PROMPTS, SEEDS, **kw)
    assert torch.equal(sample(model, PROMPTS, SEEDS, t_prime=0, **kw), plain)
    assert not torch.allclose(sample(model, PROMPTS, SEEDS, t_prime=2, **kw), plain)
    # every step reversed: the trajectory's recorded predictions, guided away from c, give the same z_0
    cond, uncond, z = encode_prompts(model, PROMPTS), encode_prompts(model, [""]), initial_noise(model, SEEDS)
    out = trajectory(model, cond, z, list(range(0, 5)), num_steps=4, guidance_scale=5.0, uncond_embeds=uncond)
    assert torch.allclose(out[0], plain, atol=1e-5)
    assert isinstance(cond, Conditioning) and cond.hidden.shape[0] == 2


@torch.no_grad()
def _reversed_by_hand(pipe, kind: str, prompts, seeds, steps: int, scale: float, t_prime: int) -> torch.Tensor:
    """Eq. 1-2 written out on the pipeline's own parts (its `encode_prompt`, denoiser and scheduler): CFG whose
    direction flips for the last `t_prime` steps; z_0."""
    n = len(prompts)
    cond, uncond, pooled, upooled = pipe.encode_prompt(*(([prompts] * 3) if kind == "sd3" else [prompts]),
                                                       device="cpu") # no negative prompt: SDXL zeros, SD3 ""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    z = torch.stack([torch.randn((pipe.vae.config.latent_channels, 8, 8), generator=torch.Generator().manual_seed(s))
                     for s in seeds]) * getattr(sched, "init_noise_sigma", 1.0)
    hidden, pool = torch.cat([uncond, cond]), torch.cat([upooled, pooled])
    for i, tau in enumerate(sched.timesteps):
        z_in = torch.cat([z, z])
        if kind == "sd3":
            out = pipe.transformer(hidden_states=z_in, timestep=tau.expand(2 * n), encoder_hidden_states=hidden,
                                   pooled_projections=pool).sample
        else:
            ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(2 * n, 1)
            out = pipe.unet(sched.scale_model_input(z_in, tau), tau, encoder_hidden_states=hidden,
                            added_cond_kwargs=dict(text_embeds=pool, time_ids=ids)).sample
        u, c = out.chunk(2)
        sign = -1.0 if steps - i <= t_prime else 1.0 # paper step t = T - i
        z = sched.step(u + sign * scale * (c - u), tau, z).prev_sample
    return z


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_reversed_guidance_equals_eq_1_2_by_hand(kind, sdxl_dir, sd3_dir):
    folder = sdxl_dir if kind == "sdxl" else sd3_dir
    ours = sample(load_model(str(folder)), PROMPTS, SEEDS, num_steps=4, guidance_scale=5.0, t_prime=2, progress=False,
                  output_type="latent")
    torch.testing.assert_close(ours, _reversed_by_hand(_pipeline(folder, kind), kind, PROMPTS, SEEDS, 4, 5.0, 2),
                               atol=1e-5, rtol=1e-5)


def test_flow_matching_timesteps_are_sigmas(sd3_dir):
    model = load_model(str(sd3_dir))
    ts = paper_timesteps(model.scheduler, 4)
    assert ts.dtype == torch.float32 and ts[0].item() == 1000.0 and bool((ts[:-1] > ts[1:]).all())


def _state(pipe) -> dict[str, dict]:
    "Every weight of a pipeline, by component and parameter name."
    parts = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    return {c: {n: p.detach().clone() for n, p in getattr(pipe, c).state_dict().items()}
            for c in parts if getattr(pipe, c, None) is not None}


@pytest.mark.parametrize("kind,method", [("sdxl", "esd-x"), ("sdxl", "ant"), ("sd3", "esd-x"), ("sd3", "ant-text")])
def test_erase_save_load_in_the_plain_pipeline(kind, method, sdxl_dir, sd3_dir, tmp_path):
    """Erase -> save -> load with the plain diffusers pipeline: the concept prompt's images change, and the folder
    differs from the original only in the trained weights (same components, same scheduler config)."""
    from ant_nb.method.erase import erase_concept
    from ant_nb.method.losses import AntLossConfig, trainable_names
    from ant_nb.method.saliency import parameter_mask
    folder, base = (sdxl_dir if kind == "sdxl" else sd3_dir), ("ant" if method == "ant-text" else method)
    model = load_model(str(folder))
    # ANT on SD3's text stream: a mask of the ESD-x set (text keys and values, context_embedder)
    mask = parameter_mask(model.unet, trainable_names(model.unet, "esd-x")) if method == "ant-text" else None
    out = tmp_path/"erased"
    erase_concept(model, ["a red cat"], method=base, mask=mask, iterations=3, lr=5e-2,
                  config=AntLossConfig(num_steps=4, t_prime=2), cache_size=2, progress=False, out_dir=out)
    pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusion3Pipeline
    before, after = pipe_cls.from_pretrained(folder), pipe_cls.from_pretrained(out)
    assert dict(before.scheduler.config) == dict(after.scheduler.config)
    assert type(before.scheduler) is type(after.scheduler)
    sb, sa = _state(before), _state(after)
    assert sb.keys() == sa.keys()
    denoiser = "unet" if kind == "sdxl" else "transformer"
    trained = set(trainable_names(getattr(before, denoiser), "esd-x" if method == "ant-text" else base))
    for comp in sb:
        changed = {n for n in sb[comp] if not torch.equal(sb[comp][n], sa[comp][n])}
        if comp != denoiser: assert not changed, (comp, sorted(changed)[:3])
        else: assert changed and changed <= trained, sorted(changed - trained)[:3]
    imgs = [_pipeline_images(p, ["a red cat"], [0], 4, 5.0) for p in (before, after)]
    assert np.abs(imgs[0] - imgs[1]).max() > 1e-3


@pytest.mark.parametrize("kind,method", [("sdxl", "uce"), ("sdxl", "ant-fusion"), ("sd3", "esd-x"), ("sd3", "uce"),
                                         ("sd3", "ant-fusion")])
def test_multi_concept_erasure(kind, method, sdxl_dir, sd3_dir, tmp_path):
    """Multi-concept erasure on SDXL edits the cross-attention keys and values (what its 2,048-wide text states feed);
    on SD3 ESD-x trains its ESD-x set and the closed forms (UCE, Eq. 7) rewrite `context_embedder` (T5 included); the
    saved folder loads in the plain pipeline with only those weights changed, and the concept's images change."""
    from ant_nb.method.losses import AntLossConfig, trainable_names
    from ant_nb.method.multi import erase_concepts
    folder = sdxl_dir if kind == "sdxl" else sd3_dir
    erased = erase_concepts(load_model(str(folder)), ["cat", "dog"], ["fox"], method, tmp_path/"run",
                            templates=["a {}", "a red {}"], prior_prompts=["a tree"], steps=2, cache_size=1,
                            progress=False,
                            loss_config=AntLossConfig(num_steps=4, t_prime=2, lambda1=0.4, lambda2=0.5, lambda3=0.2))
    save_model(erased, tmp_path/"saved")
    pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusion3Pipeline
    denoiser = "unet" if kind == "sdxl" else "transformer"
    before, after = (pipe_cls.from_pretrained(f) for f in (folder, tmp_path/"saved"))
    sb, sa = _state(before), _state(after)
    changed = {c: {n for n in sb[c] if not torch.equal(sb[c][n], sa[c][n])} for c in sb}
    allowed = ({n for n in sb["unet"] if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))} if kind == "sdxl"
               else set(trainable_names(before.transformer, "esd-x")) if method == "esd-x" else {"context_embedder.weight"})
    assert changed[denoiser] and changed[denoiser] <= allowed, sorted(changed[denoiser] - allowed)[:3]
    assert not any(changed[c] for c in changed if c != denoiser)
    imgs = [_pipeline_images(p, ["a red cat"], [0], 4, 5.0) for p in (before, after)]
    assert np.abs(imgs[0] - imgs[1]).max() > 1e-5 # 2 training steps: ESD-x on SD3 moves the pixels by ~4e-4


@pytest.mark.parametrize("kind,method", [("sd3", "mace"), ("sdxl", "mace")])
def test_multi_concept_refuses_what_the_backbone_lacks(kind, method, sdxl_dir, sd3_dir, tmp_path):
    "MACE's attention probe is SD 1.x's: a clear error before any work."
    from ant_nb.method.multi import erase_concepts
    model = load_model(str(sdxl_dir if kind == "sdxl" else sd3_dir))
    with pytest.raises(ValueError, match=f"method='{method}' does not run on this {kind} model"):
        erase_concepts(model, ["cat"], ["dog"], method, tmp_path/"run", progress=False)
    assert not (tmp_path/"run").exists()


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_nsfw_notebook_accepts_the_backbone(kind, sdxl_dir, sd3_dir, shared_data, tmp_path, monkeypatch):
    """`-p model_id` of 20_nsfw takes an SDXL or SD3 folder: the whole notebook runs with the real backend (NudeNet; a
    tiny CLIP for the CLIP score and FID's features), ESD-x and ANT with its saliency mask, gradient checkpointing on."""
    import json
    import papermill as pm
    from PIL import Image

    from ant_nb.base.testing import tiny_clip
    from ant_nb.evaluate.data import load_coco
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    clip, proc = tiny_clip()
    clip.save_pretrained(tmp_path/"clip"); proc.save_pretrained(tmp_path/"clip")
    (tmp_path/"photos").mkdir()
    for i, coco_id in enumerate(load_coco(shared_data/"coco_30k.csv").head(2).coco_id):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(tmp_path/"photos"/f"{coco_id}.png")
    params = dict(model_id=str(sdxl_dir if kind == "sdxl" else sd3_dir), backend="real", preset="paper",
                  i2p_csv=str(shared_data/"I2P_prompts_4703.csv"), coco_csv=str(shared_data/"coco_30k.csv"),
                  coco_images=str(tmp_path/"photos"), clip_model=str(tmp_path/"clip"), fid_features="clip", n_i2p=2,
                  n_coco=2, iterations=1, methods=["esd-x", "ant"], mask_seeds=[0], concept=["nudity", "naked"],
                  table5=False, stage_ablation=False, figure4_extra=False, eval_steps=2, cache_size=1,
                  gradient_checkpointing=True, out_dir=str(tmp_path/"run"))
    nbs = Path(__file__).resolve().parents[1]/"nbs"
    pm.execute_notebook(str(nbs/"20_nsfw.ipynb"), str(tmp_path/"out.ipynb"), parameters=params, kernel_name="python3",
                        progress_bar=False, cwd=str(nbs))
    run = json.loads((tmp_path/"run"/"run.json").read_text())
    assert run["params"]["model_id"] == params["model_id"] and set(run["timings_s"]) == {"original", "esd-x", "ant"}
    assert (tmp_path/"run"/"models"/"ant"/"model_index.json").exists()
