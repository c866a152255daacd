"""Memory plans, by counting, for single-concept erasure on ONE GPU: SD v1.4, SDXL base 1.0 and SD3.5-medium.

What `ant_nb.method.erase.erase_concept` holds on the GPU, item by item, for each method's trained set:
- the frozen denoiser theta* in half precision (`load_model` on CUDA), the text encoders and the VAE (half; T5 optional);
- a float32 copy of the whole denoiser (`_finetune_copy` deep-copies it), with float32 gradients and Adam's two
  float32 states for the trained tensors only (a saliency mask saves nothing here: Adam keeps states for every tensor
  holding an active weight);
- the trajectory cache: K = 32 trajectories x T = 50 latents, and the frozen predictions (eps_u, eps_c) at each;
- the activations of the trained call, in float32 (the losses cast the inputs to the trained copy's dtype; no
  autocast): ANT's one call has batch 4 (its four terms), ESD's and AC's batch 1.

Parameters are counted on the meta device from the real configs (`real_configs.py`). Activations are counted, not
measured: one forward pass of the float32 denoiser at batch 1 (1024x1024 images for SDXL and SD3.5, 512x512 for SD
1.4), with gradients on for the method's trained set, runs on fake tensors (`FakeTensorMode`, no memory, seconds),
and the tensors autograd saves for the backward pass are summed (parameters left out, each storage once); the batch-4
ANT call is 4 x that. On SD 1.4 this count (1.74 GiB per sample, float32) agrees with torch's `MemTracker` (1.75) and
with the resident memory a real CPU forward pass adds (1.9). The SD 1.4 row under bf16 autocast checks the counting against the H200 measurement of
`gpu_sd_step.py` (outputs/bench/sd14_step_cuda_bf16_b1.csv: 6.52 GiB of activations and workspace for the batch-4
call under bf16 autocast).

With `gradient_checkpointing=True` (`erase_concept`; exact, ~1/3 more time) the activation term is the forward pass's
peak with diffusers' checkpointing on, counted by torch's `MemTracker` on fake tensors (all parameters trainable: an
upper bound for the smaller sets).

Usage: python tests/bench/memory_plans.py [--backbones sd14 sdxl sd35m]   (~3 min on one CPU core)
Writes outputs/bench/memory_plans.csv / .md (every item), memory_plans_summary.csv / .md (totals, what fits 24 GB) and
memory_plan_<backbone>[_checkpointing].csv / .md (items x methods).
"""
import argparse
import time

import pandas as pd
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ant_nb.base.backbones import Conditioning, predict
from ant_nb.base.files import project_path
from ant_nb.base.report import markdown_table, save_table
from ant_nb.method.losses import trainable_names
from real_configs import (CLIP_G, CLIP_L, SD14_UNET, SD35M_TRANSFORMER, SD3_VAE, SD_VAE, SDXL_UNET, T5_XXL, n_params)

GIB, GPU_GIB = 2**30, 24
K, T = 32, 50  # trajectory cache: trajectories x steps


def _denoiser(name: str):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    if name == "sd35m": return SD3Transformer2DModel(**SD35M_TRANSFORMER)
    return UNet2DConditionModel(**(SDXL_UNET if name == "sdxl" else SD14_UNET))


def _inputs(name: str, n: int):
    "Fake inputs of one denoiser call: latents (n, C, H, W), timesteps (n,), conditioning."
    if name == "sd14": return torch.randn(n, 4, 64, 64), torch.full((n,), 500), torch.randn(n, 77, 768)
    if name == "sdxl":
        cond = Conditioning(torch.randn(n, 77, 2048), torch.randn(n, 1280), torch.full((n, 6), 1024.0))
        return torch.randn(n, 4, 128, 128), torch.full((n,), 500), cond
    return torch.randn(n, 16, 128, 128), torch.full((n,), 500.0), Conditioning(torch.randn(n, 77 + 256, 4096),
                                                                              torch.randn(n, 2048))


def count_activations(name: str, method: str, autocast: bool = False) -> float:
    """GiB that one float32 forward pass at batch 1 keeps for its backward, gradients on for `method`'s trained set:
    the tensors autograd saves (parameters excluded, each storage once), counted on fake tensors."""
    with FakeTensorMode():
        model = _denoiser(name).train()
        trained = set(trainable_names(model, method))
        for n, p in model.named_parameters(): p.requires_grad_(n in trained)
        params, saved = {p.untyped_storage()._cdata for p in model.parameters()}, {}
        def pack(x):
            storage = x.untyped_storage()
            if storage._cdata not in params: saved[storage._cdata] = storage.nbytes()
            return x
        z, t, c = _inputs(name, 1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
             torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            predict(model, z, t, c)
    return sum(saved.values()) / GIB


def count_checkpointed(name: str) -> float:
    "GiB of the forward pass's peak activations at batch 1 with gradient checkpointing (torch's MemTracker, fake tensors)."
    from torch.distributed._tools.mem_tracker import MemTracker
    with FakeTensorMode():
        model = _denoiser(name).train()
        model.enable_gradient_checkpointing() # MemTracker needs gradients on every parameter: an upper bound for subsets
        z, t, c = _inputs(name, 1)
        mt = MemTracker()
        mt.track_external(model)
        with mt: predict(model, z, t, c)
        peak = next(iter(mt.get_tracker_snapshot("peak").values()))
    return sum(v for k, v in peak.items() if "ACT" in str(k) or "TEMP" in str(k)) / GIB


METHODS = {"esd-x": ("esd-x", 1), "ac": ("ac", 1), "esd-u": ("esd-u", 1), "ant": ("ant", 4), # method: (trained set,
           "ant on the ESD-x set": ("esd-x", 4)} # batch of the trained call); ANT with a `parameter_mask` of ESD-x's set


def plan(name: str, text: dict, vae: int, latent: tuple) -> tuple[pd.DataFrame, dict]:
    "Rows of the plan of one backbone: method x item (GiB, without and with gradient checkpointing); parameter counts."
    with torch.device("meta"):
        model = _denoiser(name)
        sizes = {m: sum(p.numel() for n, p in model.named_parameters() if n in set(trainable_names(model, m)))
                 for m in ("esd-x", "ac", "esd-u", "ant")}
        weights = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    cache, ckpt, rows = K * T * torch.Size(latent).numel(), count_checkpointed(name), []
    for m, (trained, call) in METHODS.items():
        act = count_activations(name, trained) * call
        items = {"frozen denoiser (fp16)": weights * 2, "trained copy of the whole denoiser (fp32)": weights * 4,
                 "gradients of the trained tensors (fp32)": sizes[trained] * 4,
                 "Adam states of the trained tensors (2 x fp32)": sizes[trained] * 8,
                 **{f"text encoder {k} (fp16)": v * 2 for k, v in text.items()}, "VAE (fp16)": vae * 2,
                 f"trajectory cache K={K}, T={T}, and eps_u, eps_c there (fp16)": 3 * cache * 2}
        rows += [dict(backbone=name, method=m, item=k, gib=v / GIB, gib_checkpointing=v / GIB) for k, v in items.items()]
        rows.append(dict(backbone=name, method=m, item="activations of the trained call (fp32, counted; ANT: batch 4, the others 1)",
                         gib=act, gib_checkpointing=ckpt * call))
        print(f"{name} {m}: trained {sizes[trained] / 1e6:.0f} M of {weights / 1e6:.0f} M, activations {act:.2f} GiB, "
              f"with checkpointing {ckpt * call:.2f} GiB", flush=True)
    return pd.DataFrame(rows), dict(weights=weights, **{f"trained_{m}": v for m, v in sizes.items()})


BACKBONES = {  # text encoders and VAE (parameters), latent shape
    "sd14": (lambda: {"CLIP-L": n_params(lambda: _clip(CLIP_L, False))}, lambda: _vae(SD_VAE), (4, 64, 64)),
    "sdxl": (lambda: {"CLIP-L": n_params(lambda: _clip(CLIP_L, False)), "CLIP-G": n_params(lambda: _clip(CLIP_G, True))},
             lambda: _vae(SD_VAE), (4, 128, 128)),
    "sd35m": (lambda: {"CLIP-L": n_params(lambda: _clip(CLIP_L, True)), "CLIP-G": n_params(lambda: _clip(CLIP_G, True)),
                       "T5-XXL (optional: load_model(t5=False))": n_params(_t5)}, lambda: _vae(SD3_VAE), (16, 128, 128)),
}


def _clip(config: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def _vae(config: dict) -> int:
    from diffusers import AutoencoderKL
    return n_params(lambda: AutoencoderKL(**config))


def _t5():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(**T5_XXL))


def summary(df: pd.DataFrame, counts: dict) -> pd.DataFrame:
    """Per backbone and method, total GiB: as is; with gradient checkpointing; and (SD3.5) without T5; then a lever
    not in the package yet, counted: the trained copy keeps its untrained tensors in half precision. Which fits 24 GB."""
    bar = GPU_GIB * 1e9 / GIB - 0.5 # a 24 GB GPU (22.4 GiB) less ~0.5 GiB of CUDA context
    rows = []
    for (b, m), g in df.groupby(["backbone", "method"], sort=False):
        t5 = g[g.item.str.contains("T5")].gib.sum()
        untrained = counts[b]["weights"] - counts[b][f"trained_{METHODS[m][0]}"]
        row = dict(backbone=b, method=m, as_is=g.gib.sum(), checkpointing=g.gib_checkpointing.sum())
        row["checkpointing_without_t5"] = row["checkpointing"] - t5 if t5 else row["checkpointing"]
        row["and_half_untrained_weights"] = row["checkpointing_without_t5"] - untrained * 2 / GIB
        fits = [k for k in list(row)[2:] if row[k] <= bar]
        rows.append(row | dict(fits_24gb=fits[0].replace("_", " ") if fits else "no"))
    return pd.DataFrame(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out, parts, counts = project_path("outputs/bench"), [], {}
    for name in args.backbones:
        text, vae, latent = BACKBONES[name]
        df, counts[name] = plan(name, text(), vae(), latent)
        parts.append(df)
        for col, suffix in (("gib", ""), ("gib_checkpointing", "_checkpointing")):
            table = df.pivot_table(index="item", columns="method", values=col, sort=False).reset_index()
            table.loc[len(table)] = ["total", *table.iloc[:, 1:].sum().tolist()]
            save_table(table, out, f"memory_plan_{name}{suffix}")
    df = pd.concat(parts, ignore_index=True)
    save_table(df, out, "memory_plans")
    s = summary(df, counts)
    md_path = save_table(s, out, "memory_plans_summary")[1]
    bf16 = 4 * count_activations("sd14", "ant", autocast=True)
    notes = ["", "GiB per single-concept erasure run on one GPU (`erase_concept`, batch 1 as the authors), counted by "
             "tests/bench/memory_plans.py; items in memory_plan_<backbone>[_checkpointing].md. A 24 GB GPU is taken as "
             f"{GPU_GIB * 1e9 / GIB - 0.5:.1f} GiB (22.4 GiB less ~0.5 GiB of CUDA context). Columns, each adding to "
             "the previous one: `gradient_checkpointing=True`; (SD3.5) `load_model(..., t5=False)`; the trained copy "
             "keeping its untrained tensors in half precision (not in the package yet: counted only).",
             "", f"Check of the activation count: SD 1.4's batch-4 ANT call under bf16 autocast counts {bf16:.2f} GiB; "
             "gpu_sd_step.py measured 6.52 GiB of activations and workspace on an H200: under autocast the count (fake "
             "CPU tensors, CPU autocast's casts) runs 50 % above the GPU, an upper bound at best. In float32, as "
             "`erase_concept` trains, the count (1.74 GiB per sample) matches a real CPU forward pass (1.9 GiB "
             "resident)."]
    md_path.write_text(md_path.read_text() + "\n".join(notes) + "\n")
    print(md_path.read_text())
    print(pd.DataFrame(counts).T.to_string())


if __name__ == "__main__":
    main()
