"""Memory budget of single-concept ANT on SD v1.4 on ONE GPU, from the real parameter counts (meta-device models).

Weights and optimizer states are counted exactly. Activations (and allocator workspace) are taken from the GPU
measurement of tests/bench/gpu_sd_step.py when its CSVs are in outputs/bench (torch.cuda.max_memory_allocated minus
the exactly counted tensors that script holds), else from the estimate given to `main`.
Writes outputs/bench/sd14_memory_plan.csv / .md.
"""
from pathlib import Path

import pandas as pd
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ant_nb.base.files import project_path
from ant_nb.base.report import save_table
from gpu_sd_step import SD14_UNET

GB = 2**30


def n_params(make) -> int:
    with torch.device("meta"): return sum(p.numel() for p in make().parameters())


def measured_activations(held_bytes: float, out: Path) -> tuple[float, float, str] | None:
    "GiB of activations without / with gradient checkpointing from gpu_sd_step.py's CSVs, and the device; None if absent."
    files = [out/"sd14_step_cuda_bf16_b1.csv", out/"sd14_step_cuda_bf16_b1_ckpt.csv"]
    if not all(f.exists() for f in files): return None
    plain, ckpt = (pd.read_csv(f).iloc[0] for f in files)
    held = held_bytes / GB
    return plain.max_memory_allocated_gb - held, ckpt.max_memory_allocated_gb - held, plain.device


def main(activations_gb: float = 6.0, activations_ckpt_gb: float = 1.5):
    unet = n_params(lambda: UNet2DConditionModel(**SD14_UNET))
    text = n_params(lambda: CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, max_position_embeddings=77)))
    vae = n_params(lambda: AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                         down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4))
    cache = 32 * 50 * 4 * 64 * 64  # K=32 trajectories x T=50 latents (4, 64, 64)
    out = project_path("outputs/bench")
    measured = measured_activations(unet * (2 + 4 + 4 + 8), out)  # what gpu_sd_step.py holds besides activations
    what = "estimate"
    if measured is not None:
        activations_gb, activations_ckpt_gb, device = measured
        what = f"measured on {device} by gpu_sd_step.py"
    # Adam keeps states for every tensor holding an active weight of M*: a saliency mask saves no memory
    rows = [("frozen UNet θ* (fp16)", unet * 2, unet * 2),
            ("trained UNet θ (fp32)", unet * 4, unet * 4),
            ("gradients (fp32)", unet * 4, unet * 4),
            ("Adam states (2 × fp32)", unet * 8, unet * 8),
            ("text encoder (fp16; prompts encoded once)", text * 2, text * 2),
            ("trajectory cache K=32, T=50 (fp16)", cache * 2, cache * 2),
            ("frozen predictions ε_u, ε_c at the cached latents (fp16)", 2 * cache * 2, 2 * cache * 2),
            (f"activations and workspace, batch 1, bf16 autocast ({what})", activations_gb * GB, activations_ckpt_gb * GB)]
    df = pd.DataFrame([dict(item=i, gb=a / GB, gb_grad_checkpointing=b / GB) for i, a, b in rows])
    df.loc[len(df)] = dict(item="total (VAE not needed in training)", gb=df.gb.sum(),
                           gb_grad_checkpointing=df.gb_grad_checkpointing.sum())
    df["note"] = ""
    df.loc[len(df) - 1, "note"] = f"UNet {unet / 1e6:.1f}M, text {text / 1e6:.1f}M, VAE {vae / 1e6:.1f}M parameters"
    save_table(df, out, "sd14_memory_plan")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
