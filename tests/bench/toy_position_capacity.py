"""Why does the toy model ignore "on the left / in the middle / on the right"? A first-step test of the UNet.

At the first DDIM step the sampler's estimate of the clean image, x̂₀ (`scheduler.step(...).pred_original_sample`,
conditional prediction, no guidance), is the model's guess of the mean image for the prompt. If the model follows
the position words, x̂₀ of "a red circle on the left on a white background" holds the circle's colour in the image's
left third. For every (shape, colour, position, background) prompt (6 × 6 × 3 × 4 = 432), the *placed* column says
whether the third of x̂₀ that differs most from the prompt's background colour is the asked one (chance 1/3), and
`left_right_gap` is the mean absolute difference, in [-1, 1] pixel units, between the x̂₀ of the same prompt with
"on the left" and with "on the right" (0: the position words change nothing).

Part 1 measures the shipped toy models (`--models`). Part 2 (`--train_steps` > 0) asks whether the architecture can
place a subject from pure noise at all: it trains fresh UNets (the shipped three-level config, and the same with a
fourth, 4×4 level with cross-attention) only at the noisiest timestep of a zero-terminal-SNR v-prediction schedule,
where x_t is pure noise and the v target is -x₀, so the loss is minimised by the prompt's mean image. A UNet that
cannot tell left from right keeps `placed` near 1/3 however long it trains.

Usage: python tests/bench/toy_position_capacity.py [--models toy-v1 toy-v2] [--train_steps 400] [--threads 1]
Writes outputs/bench/toy_position_capacity.csv / .md (one row per model; `--name` to change the file name).
"""
import argparse
import time

import numpy as np
import pandas as pd
import torch
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from ant_nb.base.model import DiffusionModel, encode_prompts, load_model
from ant_nb.base.timesteps import prediction_target
from ant_nb.base.files import project_path
from ant_nb.base.report import save_table
from ant_nb.toy.model import UNET_CONFIG, build_toy_components
from ant_nb.toy.train import world_batch
from ant_nb.toy.prompts import WorldMix
from ant_nb.toy.grammar import caption
from ant_nb.toy.world import BACKGROUNDS, COLOURS, POSITION_PHRASES, SHAPES

THIRDS = (slice(0, 11), slice(11, 21), slice(21, 32))  # image columns of the left, middle and right third
FOUR_LEVELS = dict(block_out_channels=(32, 64, 96, 96),
                   down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
ARCHITECTURES = {"fresh, shipped config (3 levels, attention at 8×8)": {},
                 "fresh, 4 levels (attention at 8×8 and 4×4)": FOUR_LEVELS}
EVERYTHING_SAID = WorldMix(p_character=0, p_unsafe=0, p_style=0, p_say_colour=1, p_say_position=1, p_say_background=1)


def probe_prompts() -> pd.DataFrame:
    "Every (shape, colour, position, background) object prompt, with its fields."
    specs = [dict(shape=s, colour=c, position=p, background=b)
             for s in SHAPES for c in COLOURS for p in POSITION_PHRASES for b in BACKGROUNDS]
    return pd.DataFrame([spec | dict(prompt=caption(spec)) for spec in specs])


@torch.no_grad()
def first_step_x0(model: DiffusionModel, prompts: list[str], seed: int = 0) -> torch.Tensor:
    "x̂₀ (N, 3, 32, 32) in [-1, 1] at the first of 50 DDIM steps, conditional prediction, start noise from `seed`."
    sched = model.scheduler
    sched.set_timesteps(50)
    t = sched.timesteps[0]
    z = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).expand(len(prompts), -1, -1, -1)
    out = torch.cat([model.unet(z[i:i + 64], t, encode_prompts(model, prompts[i:i + 64])).sample
                     for i in range(0, len(prompts), 64)])
    return sched.step(out, t, z).pred_original_sample.clamp(-1, 1)


def placement(x0: torch.Tensor, table: pd.DataFrame) -> dict:
    "`placed` (fraction whose most-changed third is the asked one) and `left_right_gap` of x̂₀ for `table`'s prompts."
    bg = torch.tensor(np.array([BACKGROUNDS[b] for b in table.background]), dtype=torch.float32) / 127.5 - 1
    change = (x0 - bg[:, :, None, None]).abs().sum(1).mean(1)  # (N, 32): per column, mean over rows
    third = torch.stack([change[:, s].mean(1) for s in THIRDS], 1).argmax(1).numpy()
    asked = table.position.map({p: i for i, p in enumerate(POSITION_PHRASES)}).to_numpy()
    key = ["shape", "colour", "background"]
    left, right = (x0[torch.tensor((table.position == p).to_numpy())] for p in ("left", "right"))
    same_order = (table[table.position == "left"][key].to_numpy() == table[table.position == "right"][key].to_numpy()).all()
    assert same_order, "left and right prompts must pair up row by row"
    return dict(placed=float((third == asked).mean()), left_right_gap=float((left - right).abs().mean()),
                n=len(table))


def train_first_step(unet_changes: dict, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0):
    "A fresh toy UNet + text encoder trained only at the noisiest timestep (x_t = pure noise, v target = -x₀)."
    _, te, tok, sched = build_toy_components(seed, "v_prediction", zero_terminal_snr=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(UNET_CONFIG | unet_changes))
    model = DiffusionModel(unet, te, tok, sched, None, source="first-step probe")
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    t = torch.full((batch_size,), len(sched.alphas_cumprod) - 1)
    losses = []
    for _ in tqdm(range(steps), desc="first-step training", mininterval=10):
        x0, prompts = world_batch(rng, batch_size, EVERYTHING_SAID, p_drop=0.0)
        noise = torch.randn(x0.shape, generator=gen)
        pred = unet(noise, t, encode_prompts(model, prompts)).sample  # x_t = noise: ᾱ = 0 at zero terminal SNR
        loss = torch.nn.functional.mse_loss(pred, prediction_target(sched, x0, noise, t))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        losses.append(loss.item())
    unet.eval(); te.eval()
    return model, float(np.mean(losses[-50:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["toy-v1", "toy-v2"])
    ap.add_argument("--train_steps", type=int, default=0, help="0: skip part 2")
    ap.add_argument("--architectures", nargs="*", default=list(ARCHITECTURES), help="part 2: names of ARCHITECTURES")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--name", default="toy_position_capacity", help="table file name (one per process when split)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table, rows = probe_prompts(), []
    for name in args.models:
        rows.append(dict(model=name, train_steps=None, final_loss=None) | placement(
            first_step_x0(load_model(name), list(table.prompt)), table))
        print(rows[-1], flush=True)
    for name in args.architectures if args.train_steps else []:
        t0 = time.time()
        model, loss = train_first_step(ARCHITECTURES[name], args.train_steps)
        rows.append(dict(model=name, train_steps=args.train_steps, final_loss=round(loss, 4))
                    | placement(first_step_x0(model, list(table.prompt)), table) | dict(seconds=round(time.time() - t0)))
        print(rows[-1], flush=True)
    save_table(pd.DataFrame(rows), project_path(args.out), args.name)


if __name__ == "__main__":
    main()
