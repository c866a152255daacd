"""Sampling speed of toy models side by side: seconds per image of `ant_nb.base.sampling.sample` (text encoder, every
denoising step with classifier-free guidance, and the VAE decoder of a latent model), on the same cores, interleaved.

Issue 25's bar: v3 samples an image at least 2× faster than v1. The models run in turns (round 1: A, B; round 2: B,
A; ...), so a machine's changing load (other processes on the cores) falls on both; the table gives each model's
median over rounds and its ratio to the first model's. Speed does not depend on the weights' values, so a
checkpoint exported mid-training times the same as the finished model of its architecture.

Usage: python tests/bench/toy_sampling_speed.py --models toy-v1 data/toyworld/v3/model [--steps 20] [--batch 16]
       [--rounds 5] [--threads 1] [--tag NAME]
Writes outputs/bench/toy_sampling_speed[_NAME].csv / .md.
"""
import argparse
import statistics
import time

import pandas as pd
import torch

from ant_nb.base.files import project_path
from ant_nb.base.model import load_model
from ant_nb.base.registry import TOY_GUIDANCE
from ant_nb.base.report import save_table
from ant_nb.base.sampling import sample

PROMPT = "a portrait of mira tok on the left, on a grass background"


def seconds_per_image(model, batch: int, steps: int) -> float:
    "Wall seconds of one `sample` call over `batch` seeds, divided by `batch`."
    t0 = time.perf_counter()
    sample(model, [PROMPT] * batch, seeds=list(range(batch)), num_steps=steps, guidance_scale=TOY_GUIDANCE,
           progress=False)
    return (time.perf_counter() - t0) / batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="toy names or diffusers folders; the first is the reference")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (the toy experiments evaluate at 20)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    models = {m: load_model(m) for m in a.models}
    for m in models.values(): seconds_per_image(m, 2, 2) # warm-up
    times = {m: [] for m in models}
    for r in range(a.rounds):
        for name in (a.models if r % 2 == 0 else a.models[::-1]):
            times[name].append(seconds_per_image(models[name], a.batch, a.steps))
            print(f"round {r}: {name} {times[name][-1]:.3f} s/image", flush=True)
    ref = statistics.median(times[a.models[0]])
    rows = [dict(model=name, latent=models[name].vae is not None, latent_shape="×".join(map(str, models[name].latent_shape)),
                 unet_parameters=sum(p.numel() for p in models[name].unet.parameters()),
                 seconds_per_image=round(statistics.median(ts), 4), min_seconds=round(min(ts), 4),
                 speedup_vs_first=round(ref / statistics.median(ts), 2), steps=a.steps, batch=a.batch, rounds=a.rounds,
                 threads=a.threads) for name, ts in times.items()]
    df = pd.DataFrame(rows)
    save_table(df, project_path("outputs/bench"), "toy_sampling_speed" + (f"_{a.tag}" if a.tag else ""))
    print(df.to_string())


if __name__ == "__main__":
    main()
