"""Train toy-v2 from scratch on the full-size world on one GPU, within a time budget, and check it at once.

Issue 12's GPU route, prepared for a 15-minute device lease: v1's recipe (batch 512, AdamW lr 8e-4, 500 warm-up
steps, EMA 0.999, bfloat16 autocast; `outputs/toyworld/train/recipe.json`) with v-prediction, a zero-terminal-SNR
schedule and the full-size families (`ToyTrainConfig(full_cast=True)`), stopped after `--seconds` of training (the
step count is a ceiling, as in v1's run). The EMA weights are exported as a diffusers folder, and the quality report
(`ant_nb.toystudies.quality_report`, judge-v2, quality_seed 7, 256 samples, DDIM 50, `TOY_GUIDANCE`) runs on the
full-size and on the original families, with the wall time and the peak GPU memory of each part.

Writes under `--out` (default `outputs/toyworld/v2gpu`): `train/` (recipe.json, train_log.csv; checkpoints/ is
git-ignored and resumes a second call on a still-warm machine), `model/` (git-ignored), `quality_full.csv`,
`quality_original.csv`, `gpu_toy_v2.json`; with `--pack FILE`, one tar.gz of all of it but the checkpoints (the
device tool returns at most 8 files). Back here, unpack it in the repository root and run
`nbs/11_train_toyworld.ipynb` with `-p train False -p model_dir outputs/toyworld/v2gpu/model -p judge_path
data/toyworld/judge-v2.safetensors -p train_dir outputs/toyworld/v2gpu/train -p quality_seed 7` and `-p full_cast
True/False` for the notebook's reports (the Fréchet ratio to an untrained model, the sample grid).

Usage on a GPU machine with the package installed:
    python tests/bench/gpu_toy_v2.py --device cuda --workers 13 --seconds 420
On this project's lent H200, whose image has torch, transformers and peft but not diffusers or nudenet, and where
the package is not installed: fetch the wheels here into the git-ignored `.whl/`,
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 \
        nudenet==3.4.2 importlib_metadata==10.2.0 lazy-importer==0.1.0
then run there, carrying `.whl` (one call of about 9 minutes: 7 of training, the reports, the packing):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 tests/bench/gpu_toy_v2.py --device cuda --workers 13 \
        --seconds 420 --pack $OUT/v2gpu.tar.gz
A CPU smoke run (one step, 8 samples; about a minute): python tests/bench/gpu_toy_v2.py --seconds 5 --n 8 --out /tmp/v2smoke
"""
import argparse
import json
import tarfile
import time
from pathlib import Path

import pandas as pd
import torch

from ant_nb.base.model import load_model
from ant_nb.base.registry import toy_judge_path
from ant_nb.toy.judges import load_judge
from ant_nb.base.checks import check_device
from ant_nb.base.files import atomic_write_text, project_path
from ant_nb.base.report import save_table
from ant_nb.toy.train import ToyTrainConfig, export_toy_model, train_toy_model
from ant_nb.studies.quality import quality_report

V1_RECIPE = dict(batch_size=512, lr=8e-4, warmup=500)  # outputs/toyworld/train/recipe.json
QUALITY_SEED = 7  # the seed of every v2 quality report (README); no notebook default uses it


def timed(on: str, fn, *args, **kwargs):
    "(fn's result, {'seconds': wall time, 'peak_gib': peak GPU memory or None on a CPU}) of one call of `fn` on `on`."
    gpu = on.startswith("cuda")
    if gpu: torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = fn(*args, **kwargs)
    if gpu: torch.cuda.synchronize()
    return result, dict(seconds=round(time.time() - t0, 1), peak_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else None)


def pack(out: Path, name: str, file: Path):
    "A tar.gz of the folder `out` without its checkpoints, its files under `name` (`--out` as given)."
    with tarfile.open(file, "w:gz") as tar:
        for f in sorted(p for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts):
            tar.add(f, arcname=str(Path(name)/f.relative_to(out)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes rendering training batches")
    p.add_argument("--seconds", type=float, default=420.0, help="training wall-time budget of this call")
    p.add_argument("--p-character", type=float, default=0.3, help="fraction of training images showing a character")
    p.add_argument("--n", type=int, default=256, help="samples in each quality report")
    p.add_argument("--out", default="outputs/toyworld/v2gpu")
    p.add_argument("--pack", default=None, help="write a tar.gz of --out (no checkpoints) to this file")
    a = p.parse_args()
    check_device(a.device)
    out = project_path(a.out)
    cfg = ToyTrainConfig(steps=100_000, **V1_RECIPE, max_seconds=a.seconds, prediction_type="v_prediction",
                         zero_terminal_snr=True, full_cast=True, p_character=a.p_character)
    ckpts, train_cost = timed(a.device, train_toy_model, out/"train", cfg, device=a.device, workers=a.workers)
    export_toy_model(ckpts, out/"model")
    model, judge = load_model(str(out/"model"), device=a.device), load_judge(toy_judge_path("toy-v2"))
    costs = dict(train=train_cost)
    for name, full in (("full", True), ("original", False)):
        (table, _), costs[f"quality_{name}"] = timed(a.device, quality_report, model, judge, n=a.n, seed=QUALITY_SEED,
                                                      full_cast=full, progress=False)
        save_table(table, out, f"quality_{name}")
        print(f"{name} families:\n{table.to_string(index=False)}")
    steps = int(pd.read_csv(out/"train"/"train_log.csv").step.iloc[-1])
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else None
    atomic_write_text(out/"gpu_toy_v2.json", json.dumps(dict(device=a.device, gpu=gpu, trained_steps=steps,
                                                             costs=costs), indent=2))
    print(json.dumps(costs))
    if a.pack: pack(out, a.out, Path(a.pack))


if __name__ == "__main__":
    main()
