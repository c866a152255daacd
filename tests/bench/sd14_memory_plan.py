"""Memory budget of single-concept ANT on SD v1.4 on ONE GPU, from the real parameter counts (meta-device models).

Weights and optimizer states are counted exactly; activations are the one estimate (measure them with
tests/bench/gpu_sd_step.py on a GPU, which reports torch.cuda.max_memory_allocated).
Writes outputs/bench/sd14_memory_plan.csv / .md.
"""
import pandas as pd
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ant_nb.runs import project_path, save_table
from gpu_sd_step import SD14_UNET

GB = 2**30


def n_params(make) -> int:
    with torch.device("meta"): return sum(p.numel() for p in make().parameters())


def main(activations_gb: float = 6.0, activations_ckpt_gb: float = 1.5):
    unet = n_params(lambda: UNet2DConditionModel(**SD14_UNET))
    text = n_params(lambda: CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, max_position_embeddings=77)))
    vae = n_params(lambda: AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                         down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4))
    cache = 32 * 50 * 4 * 64 * 64  # K=32 trajectories x T=50 latents (4, 64, 64)
    # Adam keeps states for every tensor holding an active weight of M*: a saliency mask saves no memory
    rows = [("frozen UNet θ* (fp16)", unet * 2, unet * 2),
            ("trained UNet θ (fp32)", unet * 4, unet * 4),
            ("gradients (fp32)", unet * 4, unet * 4),
            ("Adam states (2 × fp32)", unet * 8, unet * 8),
            ("text encoder (fp16; prompts encoded once)", text * 2, text * 2),
            ("trajectory cache K=32, T=50 (fp16)", cache * 2, cache * 2),
            ("activations, batch 4 per UNet call (estimate, to measure on a GPU)", activations_gb * GB,
             activations_ckpt_gb * GB)]
    df = pd.DataFrame([dict(item=i, gb=a / GB, gb_grad_checkpointing=b / GB) for i, a, b in rows])
    df.loc[len(df)] = dict(item="total (VAE not needed in training)", gb=df.gb.sum(),
                           gb_grad_checkpointing=df.gb_grad_checkpointing.sum())
    df["note"] = ""
    df.loc[len(df) - 1, "note"] = f"UNet {unet / 1e6:.1f}M, text {text / 1e6:.1f}M, VAE {vae / 1e6:.1f}M parameters"
    save_table(df, project_path("outputs/bench"), "sd14_memory_plan")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
