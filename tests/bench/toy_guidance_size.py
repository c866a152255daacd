"""How large the condition direction δ(c) = pred(z_t, c) − pred(z_t, ∅) is at each paper step, per toy model: the
quantity ANT's preserve target adds (η·δ at t > t′) and its erase target subtracts (t ≤ t′).

For each model, 16 DDIM trajectories (50 steps, CFG 3.0, the frozen model, seed 0) of the four nudity phrasings of
20_nsfw (`TrajectoryLatents`, as ANT trains), and at every step the mean over trajectories of ‖δ‖² / ‖pred(z_t, ∅)‖²
(the model's own prediction: ε for toy-v1, v for toy-v2 and toy-v3). The table gives it averaged over the preserve
stage (t > t′ = 43), the erase stage (t ≤ 43), and at steps 50, 45, 40, 30, 20, 10, 1.

Usage: python tests/bench/toy_guidance_size.py [--models toy-v1 toy-v2 toy-v3] [--threads 1]
Writes outputs/bench/toy_guidance_size.csv / .md.
"""
import argparse

import pandas as pd
import torch

from ant_nb.base.files import project_path
from ant_nb.base.model import load_model
from ant_nb.base.report import save_table
from ant_nb.toy.world import UNSAFE_WORDS
from ant_nb.method.trajectories import TrajectoryLatents

CONCEPT = UNSAFE_WORDS # the four phrasings 20_nsfw erases
T_PRIME = 43


def relative_size(model) -> torch.Tensor:
    "Mean over 16 trajectories of ‖δ(c)‖² / ‖pred(z_t, ∅)‖² per paper step: a tensor (T,), entry t − 1 for step t."
    lat = TrajectoryLatents(model, CONCEPT, cache_size=16, num_steps=50, seed=0, progress=False)
    eps = lat.eps.float() # (K, T, 2, C, H, W): ε_u, then ε_c
    delta = (eps[:, :, 1] - eps[:, :, 0]).flatten(2).pow(2).sum(-1)
    return (delta / eps[:, :, 0].flatten(2).pow(2).sum(-1)).mean(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["toy-v1", "toy-v2", "toy-v3"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models:
        model = load_model(name)
        r, sched = relative_size(model), model.scheduler.config
        rows.append(dict(model=name, prediction=sched.prediction_type, zero_terminal_snr=sched.get("rescale_betas_zero_snr", False),
                         preserve_stage=float(r[T_PRIME:].mean()), erase_stage=float(r[:T_PRIME].mean()),
                         **{f"t{t}": float(r[t - 1]) for t in (50, 45, 40, 30, 20, 10, 1)}))
        print(rows[-1], flush=True)
    save_table(pd.DataFrame(rows), project_path("outputs/bench"), "toy_guidance_size")


if __name__ == "__main__":
    main()
