"""SD-v1.4-sized single-concept ANT step on one GPU: iterations/s, UNet calls per iteration, peak memory.

Builds an SD v1.4-shaped UNet from its config (random weights are fine for time and memory when the hub is out of
reach; `--model CompVis/stable-diffusion-v1-4` loads the real one), keeps the frozen copy θ* in half precision and
trains a float32 copy θ under autocast with the package's `ant_loss` (Eq. 3: one batched frozen call, one batched
trained call) and Adam, on z_t drawn from a trajectory cache (random latents of the right shape: the cost of a step
does not depend on their values). Options: `--dtype bf16|fp16`, `--grad-ckpt`, `--mask-fraction f` (train a
saliency-masked subset; optimizer states only for tensors holding active weights).

Usage (≤ 5 min on an H200): python tests/bench/gpu_sd_step.py --iters 30
CPU smoke run: python tests/bench/gpu_sd_step.py --tiny --iters 2
Writes outputs/bench/sd14_step_<device>_<dtype>_b<batch>[_ckpt][_mask<f>].csv (and .md).
"""
import argparse
import copy
import time

import pandas as pd
import torch
from diffusers import UNet2DConditionModel

from ant_nb.method.losses import AntLossConfig, ant_loss
from ant_nb.base.files import project_path
from ant_nb.base.report import save_table

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_UNET = dict(SD14_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=16)


def _unet(args) -> UNet2DConditionModel:
    if args.model: return UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    torch.manual_seed(0)
    return UNet2DConditionModel(**(TINY_UNET if args.tiny else SD14_UNET))


def _count_calls(*unets) -> list:
    counts = [0]
    for u in unets: u.register_forward_pre_hook(lambda m, a, c=counts: c.__setitem__(0, c[0] + 1))
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="hub id or folder with a unet/ subfolder; default: SD v1.4 config")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet (CPU smoke run)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1, help="samples per iteration (the authors use 1)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--mask-fraction", type=float, default=None, help="fraction of weights active in M*")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    half = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    trained = _unet(args).to(dev, torch.float32).train()
    frozen = copy.deepcopy(trained).to(half).eval().requires_grad_(False)
    if args.grad_ckpt: trained.enable_gradient_checkpointing()
    params = list(trained.parameters())
    if args.mask_fraction is not None:  # a random M* of that density, as the saliency map would give
        g = torch.Generator().manual_seed(0)
        masks = [torch.rand(p.shape, generator=g).lt(args.mask_fraction).to(dev) for p in params]
        keep = [(p, m) for p, m in zip(params, masks) if m.any()]
        for p in params: p.requires_grad_(False)
        for p, _ in keep: p.requires_grad_(True)
        params = [p for p, _ in keep]
    opt = torch.optim.Adam(params, lr=5e-4)
    calls = _count_calls(trained, frozen)
    cfg = AntLossConfig(t_prime=43, loss_space="prediction") # SD 1.4 predicts ε: the same loss as "epsilon", no scheduler needed
    c, h, w = trained.config.in_channels, trained.config.sample_size, trained.config.sample_size
    d = trained.config.cross_attention_dim
    cache = torch.randn(32, c, h, w, device=dev)  # stands for z_t of cached trajectories
    cond, uncond = torch.randn(1, 77, d, device=dev), torch.randn(1, 77, d, device=dev)
    if dev == "cuda": torch.cuda.reset_peak_memory_stats()

    def step(i):
        k = torch.randint(0, 32, (2 * args.batch,))
        z1, z2 = cache[k[:args.batch]], cache[k[args.batch:]]
        t1, t2 = torch.randint(841, 981, (args.batch,), device=dev), torch.randint(1, 841, (args.batch,), device=dev)
        with torch.autocast(dev, dtype=half):
            loss, _ = ant_loss(trained, frozen, z1, z2, t1, t2, cond, uncond, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.mask_fraction is not None:
            for p, m in keep: p.grad.mul_(m)
        opt.step()

    for i in range(2): step(i)  # warm-up
    if dev == "cuda": torch.cuda.synchronize()
    calls[0] = 0
    t0 = time.perf_counter()
    for i in range(args.iters): step(i)
    if dev == "cuda": torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / args.iters
    row = dict(device=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", unet="tiny" if args.tiny else
               (args.model or "SD v1.4 config, random weights"), params_m=sum(p.numel() for p in trained.parameters()) / 1e6,
               batch=args.batch, dtype=args.dtype, grad_ckpt=args.grad_ckpt, mask_fraction=args.mask_fraction,
               iters_per_second=1 / sec, unet_calls_per_iter=calls[0] / args.iters,
               max_memory_allocated_gb=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)
    df = pd.DataFrame([row])
    name = (f"sd14_step_{'tiny' if args.tiny else dev}_{args.dtype}_b{args.batch}" + ("_ckpt" if args.grad_ckpt else "")
            + (f"_mask{args.mask_fraction:g}" if args.mask_fraction is not None else ""))
    save_table(df, project_path(args.out), name)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
