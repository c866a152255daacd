"""Single-concept erasure steps at the real sizes of SD 1.4, SDXL and SD3.5-medium on one GPU: seconds per iteration
and peak GPU memory, to set beside the counted plans of memory_plans.py.

The model is built from the real configs (`real_configs.py`) with random weights (time and memory do not depend on
the values), in half precision on the GPU, with offline tokenizers of the real vocabulary sizes; SD3.5 without T5. The
trajectory cache holds random latents and predictions of the right shapes (K = 32, T = 50), so the run times the
erasure itself: `ant_nb.method.erase.erase_concept` with the method's trained set, the frozen predictions read from
the cache as in a real cached run, a float32 trained copy, Adam.

Usage (a few minutes per line on an H200):
  python tests/bench/gpu_backbone_step.py --backbone sdxl --method ac --grad-ckpt --iters 5
  python tests/bench/gpu_backbone_step.py --backbone sd35m --method esd-x --grad-ckpt
CPU smoke run: python tests/bench/gpu_backbone_step.py --backbone sdxl --tiny --iters 2
Writes outputs/bench/step_<backbone>_<method>[_ckpt]_<device>.csv / .md.
"""
import argparse
import tempfile
import time

import pandas as pd
import torch

from ant_nb.base.files import project_path
from ant_nb.base.model import DiffusionModel, load_model
from ant_nb.base.report import save_table
from ant_nb.method.erase import erase_concept
from ant_nb.method.losses import AntLossConfig, trainable_names
from ant_nb.method.saliency import parameter_mask
from ant_nb.method.trajectories import TrajectoryLatents
from real_configs import (CLIP_G, CLIP_L, SD14_UNET, SD35M_TRANSFORMER, SD3_VAE, SD_VAE, SDXL_UNET,
                          sd_vocab_tokenizer)

CONCEPT = ["nudity", "naked", "erotic", "sexual"]


def real_model(name: str, device: str) -> DiffusionModel:
    "A randomly initialised model of the real shapes, in half precision on `device` (SD3.5 without T5)."
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    tok, dt = sd_vocab_tokenizer(), torch.float16
    sd_schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.device(device): # the weights are made on the device; the schedulers (CPU tensors) outside
        denoiser = (SD3Transformer2DModel(**SD35M_TRANSFORMER) if name == "sd35m" else
                    UNet2DConditionModel(**(SDXL_UNET if name == "sdxl" else SD14_UNET))).to(dt)
        text = (CLIPTextModel if name != "sd35m" else CLIPTextModelWithProjection)(CLIPTextConfig(**CLIP_L)).to(dt)
        text2 = None if name == "sd14" else CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).to(dt)
        vae = AutoencoderKL(**(SD3_VAE if name == "sd35m" else SD_VAE)).to(dt)
    if name == "sd14": return DiffusionModel(denoiser, text, tok, DDIMScheduler(**sd_schedule), vae, source="sd14-shaped")
    if name == "sdxl":
        return DiffusionModel(denoiser, text, tok, EulerDiscreteScheduler(**sd_schedule), vae, source="sdxl-shaped",
                              text_encoder_2=text2, tokenizer_2=tok, force_zeros_for_empty_prompt=True)
    return DiffusionModel(denoiser, text, tok, FlowMatchEulerDiscreteScheduler(shift=3.0), vae, source="sd35m-shaped",
                          text_encoder_2=text2, tokenizer_2=tok)


def tiny_model(name: str) -> DiffusionModel:
    from ant_nb.base.testing import build_tiny_sd, build_tiny_sd3, build_tiny_sdxl
    build = dict(sd14=build_tiny_sd, sdxl=build_tiny_sdxl, sd35m=lambda p: build_tiny_sd3(p, t5=False))[name]
    return load_model(str(build(tempfile.mkdtemp() + "/tiny")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="sdxl", choices=["sd14", "sdxl", "sd35m"])
    ap.add_argument("--method", default="esd-x", choices=["esd-x", "ac", "esd-u", "ant", "ant-x"],
                    help="ant-x: ANT with a mask of ESD-x's trained set")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="the tiny pipeline on the CPU (smoke run)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    model = tiny_model(args.backbone) if args.tiny else real_model(args.backbone, dev)
    model.unet.eval().requires_grad_(False)
    for m in (model.text_encoder, model.text_encoder_2, model.vae):
        if m is not None: m.eval().requires_grad_(False)
    method, mask = args.method, None
    if method == "ant-x": method, mask = "ant", parameter_mask(model.unet, trainable_names(model.unet, "esd-x"))
    K, T = 32, 50
    gen = CONCEPT if method != "ac" else [""]
    lat = TrajectoryLatents(model, gen, cache_size=K, num_steps=T, progress=False)
    shape = (K, T, *model.latent_shape)
    lat.cache = (torch.randn(shape, device=dev).to(model.dtype), torch.randn((K, T, 2, *model.latent_shape),
                                                                            device=dev).to(model.dtype))
    if dev == "cuda": torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    stamps = []
    t0 = time.time()
    erase_concept(model, CONCEPT, method, mask=mask, iterations=args.iters + 1, lr=1e-5, cache_size=K,
                  config=AntLossConfig(), trajectories=None if method == "ac" else lat, progress=False,
                  gradient_checkpointing=args.grad_ckpt, callback=lambda s, v: stamps.append(time.time()))
    per_iter = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) # the first iteration (warm-up) left out
    row = dict(device=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", backbone=args.backbone,
               size="tiny" if args.tiny else "real", method=args.method, grad_ckpt=args.grad_ckpt,
               trained_m=sum(p.numel() for n, p in model.unet.named_parameters()
                             if n in set(trainable_names(model.unet, "esd-x" if args.method == "ant-x" else method))) / 1e6,
               seconds_per_iter=per_iter, seconds_total=time.time() - t0,
               max_memory_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)
    name = f"step_{args.backbone}_{args.method}{'_ckpt' if args.grad_ckpt else ''}_{'tiny' if args.tiny else dev}"
    save_table(pd.DataFrame([row]), project_path("outputs/bench"), name)
    print(pd.DataFrame([row]).to_string(index=False))


if __name__ == "__main__":
    main()
