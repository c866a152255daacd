"""ANT iterations/s: the package's loop against a faithful re-implementation of the authors' loop structure.

Same UNet, same loss hyper-parameters (Table 6, nudity: t' = 43 of T = 50, λ = (1, .5, .5), batch 1, Adam),
same machine, in one run, interleaved so that both loops see the same machine load. UNet calls and UNet
evaluations (batch items) per iteration are counted by a forward hook.

The authors' loop, per iteration: draw t1, t2; run two *separate* partial DDIM samplings with CFG from the same
start code with the trainable model (T → t1 and T → t2); then eight separate UNet calls (four frozen, four trained);
backward; step. Their script draws the preserve step from the *last* 7 steps and the erase step from the first 43
(`stage_order="official-single"`), so its two samplings cost ≈ 68 guided steps on average: that loop is the
reference of `speedup_vs_official_loop`. The same structure with the paper's stage order (≈ 32 guided steps) is
reported beside it.

The package's loop (`ant_nb.erase.erase_concept`): z_t1 and z_t2 come from a cache of frozen-model trajectories
(`cache_size` > 0) or from one trajectory (`cache_size=0`); then one batched trained call. The frozen model's
predictions at z_t1 and z_t2 were computed by the sampler that made the trajectory and are reused
(`record_eps=True`, the default); with `record_eps=False` they cost one more batched frozen call.

Usage: python tests/bench/bench_step.py [--model toy|PATH] [--iters 20] [--rounds 2]
Writes outputs/bench/step_throughput.csv; the last printed line is `speedup_vs_official_loop=<x>`.
"""
import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ant_nb.base.model import encode_prompts, load_model, with_unet
from ant_nb.base.timesteps import paper_step_to_timestep
from ant_nb.base.testing import build_tiny_sd
from ant_nb.method.erase import erase_concept
from ant_nb.method.losses import AntLossConfig, ant_targets, draw_steps
from ant_nb.method.trajectories import TrajectoryLatents
from ant_nb.base.files import project_path
from ant_nb.base.report import save_table
from ant_nb.base.sampling import trajectory

CONCEPT = ["nudity", "naked", "erotic", "sexual"]


class CallCounter:
    "Counts UNet calls and evaluated batch items with forward pre-hooks (a closure: deep copies keep counting here)."
    def __init__(self, *unets):
        self.counts = [0, 0]
        def hook(module, args, counts=self.counts):
            counts[0] += 1
            counts[1] += args[0].shape[0]
        self.handles = [u.register_forward_pre_hook(hook) for u in unets]

    def reset(self) -> tuple[int, int]:
        "(calls, items) since the last reset."
        out = tuple(self.counts)
        self.counts[:] = [0, 0]
        return out

    def remove(self):
        for h in self.handles: h.remove()


def official_iteration(model, trained, frozen, opt, cond, uncond, config, gen):
    "One iteration with the authors' loop structure (see the module docstring); `config.stage_order` sets t1, t2."
    t1, t2 = draw_steps(config, 1, gen)
    noise = torch.randn((1, *model.latent_shape), generator=gen)
    sampler = with_unet(model, trained)
    z1 = trajectory(sampler, cond, noise, [int(t1)], config.num_steps, 3.0, uncond)[int(t1)]
    z2 = trajectory(sampler, cond, noise, [int(t2)], config.num_steps, 3.0, uncond)[int(t2)]
    ts1 = paper_step_to_timestep(model.scheduler, int(t1), config.num_steps)
    ts2 = paper_step_to_timestep(model.scheduler, int(t2), config.num_steps)
    eps = lambda unet, z, ts, emb: unet(z, ts, encoder_hidden_states=emb).sample
    with torch.no_grad():
        fu1, fc1, fu2, fc2 = eps(frozen, z1, ts1, uncond), eps(frozen, z1, ts1, cond), \
            eps(frozen, z2, ts2, uncond), eps(frozen, z2, ts2, cond)
    pc1, pu1, pc2, pu2 = eps(trained, z1, ts1, cond), eps(trained, z1, ts1, uncond), \
        eps(trained, z2, ts2, cond), eps(trained, z2, ts2, uncond)
    loss = F.mse_loss(pc1, ant_targets(fu1, fc1, config.eta, +1)) \
        + config.lambda1 * F.mse_loss(pc2, ant_targets(fu2, fc2, config.eta, -1)) \
        + config.lambda2 * F.mse_loss(pu1, fu1) + config.lambda3 * F.mse_loss(pu2, fu2)
    opt.zero_grad(); loss.backward(); opt.step()


def time_official(model, iters, config, seed=0):
    "Seconds, UNet calls and UNet batch items per iteration of the authors' loop structure under `config`."
    frozen = model.unet
    trained = copy.deepcopy(frozen).float().train()
    counter = CallCounter(frozen, trained)
    opt = torch.optim.Adam(trained.parameters(), lr=5e-4)
    gen = torch.Generator().manual_seed(seed)
    cond, uncond = encode_prompts(model, CONCEPT[:1]), encode_prompts(model, [""])
    t0 = time.perf_counter()
    for _ in range(iters): official_iteration(model, trained, frozen, opt, cond, uncond, config, gen)
    seconds = time.perf_counter() - t0
    calls, items = counter.reset()
    counter.remove()
    return seconds / iters, calls / iters, items / iters


def time_package(model, iters, config, cache_size, record_eps=True, seed=0):
    "Seconds, UNet calls and UNet batch items per iteration of `erase_concept` (trajectory cache filled beforehand)."
    counter = CallCounter(model.unet)  # deep-copied with its hook into the trained UNet
    latents = TrajectoryLatents(model, CONCEPT, cache_size=cache_size, num_steps=config.num_steps, seed=seed,
                                progress=False, record_eps=record_eps)
    if cache_size: latents.latents  # the cache is filled once, before timing (its cost is reported separately)
    counter.reset()
    t0 = time.perf_counter()
    erase_concept(model, CONCEPT, "ant", iterations=iters, lr=5e-4, config=config, cache_size=cache_size,
                  trajectories=latents, progress=False)
    seconds = time.perf_counter() - t0
    calls, items = counter.reset()
    counter.remove()
    return seconds / iters, calls / iters, items / iters


def _tiny_sd() -> str:
    "A tiny random SD-format model in a temp folder."
    import tempfile
    return str(build_tiny_sd(Path(tempfile.mkdtemp())/"tiny-sd"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy", help="'toy', 'tiny' (tiny random SD) or a diffusers folder")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(_tiny_sd() if args.model == "tiny" else args.model)
    config = AntLossConfig(t_prime=43, lambda1=1.0, lambda2=0.5, lambda3=0.5, num_steps=50)
    authors = replace(config, stage_order="official-single")
    t_fill = time.perf_counter()
    TrajectoryLatents(model, CONCEPT, cache_size=32, num_steps=50, progress=False).latents
    fill_seconds = time.perf_counter() - t_fill
    rows = []
    for r in range(args.rounds):  # interleaved rounds: both loops see the same machine load
        for name, fn in (("package, cached trajectories (K=32) with recorded ε", lambda: time_package(model, args.iters, config, 32)),
                         ("package, cached trajectories (K=32), frozen call", lambda: time_package(model, args.iters, config, 32, False)),
                         ("package, one fresh trajectory per iteration", lambda: time_package(model, max(2, args.iters // 4), config, 0)),
                         ("authors' loop, their stage order", lambda: time_official(model, max(2, args.iters // 4), authors)),
                         ("authors' loop structure, paper's stage order", lambda: time_official(model, max(2, args.iters // 4), config))):
            s, calls, items = fn()
            rows.append(dict(loop=name, round=r, seconds_per_iter=s, unet_calls_per_iter=calls, unet_items_per_iter=items))
    df = pd.DataFrame(rows).groupby("loop", sort=False).agg(
        seconds_per_iter=("seconds_per_iter", "median"), unet_calls_per_iter=("unet_calls_per_iter", "mean"),
        unet_items_per_iter=("unet_items_per_iter", "mean")).reset_index()
    df["iters_per_second"] = 1 / df.seconds_per_iter
    official = df.loc[df.loop == "authors' loop, their stage order", "seconds_per_iter"].item()
    df["speedup_vs_official_loop"] = official / df.seconds_per_iter
    df["model"], df["threads"], df["cache_fill_seconds_K32"] = args.model, args.threads, fill_seconds
    save_table(df, project_path(args.out), "step_throughput")
    print(df.to_string(index=False))
    best = df.loc[df.loop.str.endswith("recorded ε"), "speedup_vs_official_loop"].item()
    print(f"speedup_vs_official_loop={best:.1f}")


if __name__ == "__main__":
    main()
