"""The component configs of the real models the benches size things by: SD v1.4, SDXL base 1.0 and SD3.5-medium, as
their `config.json` files give them (written out here: the hub is out of reach), and builders of randomly initialised
models of those shapes (for time and memory: random weights cost what real ones do).

`build_sd14(path)` writes an SD-v1.4-shaped StableDiffusionPipeline folder (860 M UNet, 123 M CLIP ViT-L/14 text
encoder, 84 M VAE; float32 safetensors, ~4.3 GB) with an offline CLIP tokenizer of SD's vocabulary size (49,408
entries; single characters plus fillers, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407 as in SD's).
"""
from pathlib import Path

import torch

# --- SD v1.4 (CompVis/stable-diffusion-v1-4) ---------------------------------------------------------------------
SD14_UNET = dict(  # unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32)
CLIP_L = dict(  # text_encoder/config.json: CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
    pad_token_id=1, projection_dim=768)
SD_VAE = dict(  # vae/config.json (SD 1.x; SDXL's has the same shape)
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512)
SD14_SCHEDULER = dict(  # scheduler/scheduler_config.json (PNDM; load_model turns it into DDIM)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
    skip_prk_steps=True, steps_offset=1, clip_sample=False)

# --- SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0) ------------------------------------------------------
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32)
CLIP_G = dict(  # text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower (CLIPTextModelWithProjection)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280)

# --- SD3.5-medium (stabilityai/stable-diffusion-3.5-medium) --------------------------------------------------------
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
T5_XXL = dict(  # text_encoder_3/config.json: T5 v1.1 XXL's encoder
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, dense_act_fn="gelu_new", is_gated_act=True)
SD3_VAE = dict(SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)


def sd_vocab_tokenizer():
    "An offline CLIPTokenizer with SD's vocabulary size and special-token ids (single characters, then fillers)."
    from transformers import CLIPTokenizer
    vocab = {}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-": vocab[ch + suffix] = len(vocab)
    while len(vocab) < 49406: vocab[f"<filler{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def build_sd14(path: str | Path, seed: int = 0) -> Path:
    "Write an SD-v1.4-shaped pipeline with random weights (float32) to `path` (a StableDiffusionPipeline folder)."
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ant_nb.base.model import DiffusionModel, save_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD14_UNET).eval()
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
        vae = AutoencoderKL(**SD_VAE).eval()
    model = DiffusionModel(unet, text, sd_vocab_tokenizer(), PNDMScheduler.from_config(SD14_SCHEDULER), vae, source="sd14-shaped")
    return save_model(model, path)


def n_params(make) -> int:
    "Parameters of the module `make()` builds, counted on the meta device (no memory)."
    with torch.device("meta"): return sum(p.numel() for p in make().parameters())
