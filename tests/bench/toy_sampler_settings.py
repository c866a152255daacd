"""Does a sampler setting fix the toy model's background and position? The quality report under several settings.

Runs `ant_nb.toystudies.quality_report` (held-out prompt combinations, `--n` samples) on the shipped toy model with the
default DDIM sampler (50 steps, guidance `TOY_GUIDANCE`) and with one change at a time: other guidance, 100 steps,
"trailing" timestep spacing (starts at t = 999), and no clipping of the predicted clean image.

Usage: python tests/bench/toy_sampler_settings.py [--n 128]
Writes outputs/toyworld/sampler_settings.csv / .md (one row per setting, one column per metric).
"""
import argparse

import pandas as pd
import torch

from ant_nb.base.model import load_model
from ant_nb.toy.judges import load_judge
from ant_nb.base.files import project_path
from ant_nb.base.report import save_table
from ant_nb.studies.quality import quality_report
from ant_nb.base.registry import TOY_GUIDANCE

SETTINGS = {  # name: (quality_report keywords, scheduler config changes)
    f"default (DDIM 50, guidance {TOY_GUIDANCE:g})": ({}, {}),
    "guidance 1.5": (dict(guidance_scale=1.5), {}),
    "guidance 2": (dict(guidance_scale=2.0), {}),
    "guidance 3": (dict(guidance_scale=3.0), {}),
    "DDIM 100 steps": (dict(num_steps=100), {}),
    "trailing timestep spacing": ({}, dict(timestep_spacing="trailing")),
    "no clipping of x0": ({}, dict(clip_sample=False)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/toyworld")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    judge, rows = load_judge(), []
    for name, (kw, sched) in SETTINGS.items():
        model = load_model("toy")
        model.scheduler = model.scheduler.__class__.from_config(model.scheduler.config, **sched)
        df, _ = quality_report(model, judge, n=args.n, batch_size=args.n, progress=False, **kw)
        rows.append(dict(setting=name, **dict(zip(df.metric, df.value))))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    save_table(table, project_path(args.out), "sampler_settings")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
