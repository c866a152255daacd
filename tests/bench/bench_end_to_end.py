"""End-to-end wall time and peak memory of the toy-world erasures, with the experiment notebooks' default settings.

- single concept (the `20_nsfw` default): saliency mask M* from the 4 phrasings × 5 seeds (top 50 % per map,
  intersected), then `erase_concept(method="ant", preset="toy", mask=M*)` with 32 cached trajectories;
- ten concepts (the `30_celebrity` default): `erase_concepts` with ANT-fusion, one LoRA per erased character
  (`experiment_settings("celebrity", "toy")`), prior and domain preservation, closed-form fusion.

Each part runs in its own process (so its peak resident memory is its own), on `--threads` torch threads, in a fresh
temporary folder (nothing cached from earlier runs). Bars (issue 6): single ≤ 2 min, ten concepts ≤ 10 min on 2 CPU
cores.

Usage: python tests/bench/bench_end_to_end.py [--threads 2]
Writes outputs/bench/end_to_end.csv / .md.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ant_nb.base.files import project_path
from ant_nb.base.report import save_table
from ant_nb.method.saliency import MASK_SEEDS
from ant_nb.toy.world import UNSAFE_WORDS

CONCEPT = UNSAFE_WORDS # the four phrasings 20_nsfw erases


def single_concept(folder: Path):
    "Saliency mask + masked ANT fine-tuning of the toy model, as nbs/20_nsfw.ipynb does by default."
    from ant_nb.base.model import load_model
    from ant_nb.method.erase import erase_concept, erase_defaults
    from ant_nb.method.saliency import saliency_mask
    model = load_model("toy")
    config = erase_defaults("ant", "toy")["config"]
    mask = saliency_mask(model, CONCEPT, MASK_SEEDS, top_fraction=0.5, config=config, progress=False)
    erase_concept(model, CONCEPT, "ant", mask=mask, preset="toy", cache_size=32, progress=False,
                  out_dir=folder/"model")


def ten_concepts(folder: Path):
    "ANT-fusion erasure of the 10 toy characters to erase, keeping the other 10, as nbs/30_celebrity.ipynb does."
    from ant_nb.base.model import load_model
    from ant_nb.method.fusion import gram_from_prompts
    from ant_nb.method.lora import LoraSettings
    from ant_nb.evaluate.backends import load_backend
    from ant_nb.evaluate.scores import experiment_table, prior_table
    from ant_nb.studies.presets import experiment_settings
    from ant_nb.method.multi import erase_concepts
    model = load_model("toy")
    cfg = experiment_settings("celebrity", "toy")
    backend = load_backend("toy")
    table = experiment_table("celebrity", backend, None, cfg["per_concept"])
    erase = table[table.group == "erased"].concept.unique().tolist()
    keep = table[table.group == "preserved"].concept.unique().tolist()
    prior = gram_from_prompts(model, prior_table(backend, None, cfg["n_prior"], 0).prompt.tolist())
    erase_concepts(model, erase, keep, "ant-fusion", folder/"run", templates=cfg["templates"], prior_prompts=prior,
                   loss_config=cfg["loss_config"], lora=LoraSettings(rank=cfg["rank"]), fusion=cfg["fusion"],
                   steps=cfg["steps"], lr=cfg["lr"], cache_size=cfg["cache_size"], progress=False)
    return len(erase)


PARTS = {"single-concept erase (saliency + ANT)": single_concept, "10-concept erase (ANT LoRAs + fusion)": ten_concepts}
BARS = {"single-concept erase (saliency + ANT)": 120, "10-concept erase (ANT LoRAs + fusion)": 600}


def run_part(name: str, threads: int) -> dict:
    "Run one part in this process; its wall time and this process's peak resident memory."
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        PARTS[name](Path(d))
        seconds = time.perf_counter() - t0
    return dict(part=name, seconds=seconds, bar_seconds=BARS[name], peak_rss_gb=resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20, threads=threads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=list(PARTS), help="run one part here and print its row as JSON (internal)")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, args.threads)))
        return
    rows = []
    for name in PARTS:
        out = subprocess.run([sys.executable, __file__, "--part", name, "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    df = pd.DataFrame(rows)
    df["meets_bar"] = df.seconds <= df.bar_seconds
    save_table(df, project_path(args.out), "end_to_end")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
