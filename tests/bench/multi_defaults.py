"""Do the package's defaults erase toy characters that no notebook erases? (issue 24, item 7)

`erase_concepts(load_model(model), erase, keep, method)` with nothing else given (the `"toy"` preset on a toy model)
erases the characters the notebooks keep and keeps the ones they erase, then every character is drawn from the toy
templates that no method trains on (`ant_nb.studies.multi.toy_templates` minus the training templates) at
`--seeds` evaluation seeds each; the judge names the character. Writes `outputs/bench/multi_defaults.{csv,md}` (a new
file name with `--tag`; an existing table is never overwritten).

    OMP_NUM_THREADS=1 python tests/bench/multi_defaults.py --methods ant-fusion uce
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ant_nb.base.files import project_path
from ant_nb.base.model import load_model
from ant_nb.base.registry import TOY_GUIDANCE
from ant_nb.base.report import save_table
from ant_nb.evaluate.backends import load_backend
from ant_nb.evaluate.scores import eval_images
from ant_nb.method.lora import TEMPLATES
from ant_nb.method.multi import erase_concepts
from ant_nb.method.presets import MULTI_METHODS
from ant_nb.studies.multi import statistics
from ant_nb.studies.splits import leak_table, toy_templates
from ant_nb.toy.world import CHARACTERS_ERASE, CHARACTERS_PRESERVE


def prompt_table(erase: list[str], keep: list[str], templates: list[str], seeds: int) -> pd.DataFrame:
    "One row per (concept, template, seed): erased concepts first."
    rng = np.random.default_rng(0)
    rows = [dict(group=g, concept=c, template=t, prompt=t.format(c)) for g, cs in (("erased", erase), ("preserved", keep))
            for c in cs for t in templates for _ in range(seeds)]
    return pd.DataFrame(rows).assign(evaluation_seed=rng.choice(2**31, len(rows), replace=False))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--methods", nargs="+", default=["ant-fusion"], choices=MULTI_METHODS)
    p.add_argument("--seeds", type=int, default=2, help="evaluation seeds per concept and template")
    p.add_argument("--num-steps", type=int, default=20, help="DDIM steps of the evaluation")
    p.add_argument("--tag", default="", help="suffix of the table's name")
    a = p.parse_args()
    torch.set_num_threads(1)
    name = "multi_defaults" + (f"_{a.tag}" if a.tag else "")
    out = project_path("outputs/bench")
    if (out / f"{name}.csv").exists(): raise FileExistsError(f"{out / name}.csv exists; pass another --tag")
    model, erase, keep = load_model(a.model), list(CHARACTERS_PRESERVE), list(CHARACTERS_ERASE)
    backend = load_backend(model)
    trained = TEMPLATES["toy-character"]
    templates = [t for t in toy_templates("celebrity") if t not in trained]
    table = prompt_table(erase, keep, templates, a.seeds)
    leaks = leak_table(model, {"evaluation": table}, trained)
    stats, rows = statistics("celebrity", len(erase) * len(templates) * a.seeds), []
    with tempfile.TemporaryDirectory() as d:
        for method in ["original", *a.methods]:
            t0 = time.time()
            m = model if method == "original" else erase_concepts(model, erase, keep, method, progress=False)
            train_s = time.time() - t0
            images = eval_images(m, table, Path(d) / method, TOY_GUIDANCE, a.num_steps, 64, progress=False)
            hit = np.array([x == c for x, c in zip(backend.identify(images, sorted(set(table.concept))), table.concept)], float)
            rows.append(dict(method=method, **{k: round(float(f(hit)), 3) for k, f in stats.items()},
                             prompts=len(table), templates=len(templates), erase_seconds=round(train_s, 1),
                             seconds=round(time.time() - t0, 1)))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows).assign(model=a.model, identical_name_states=int(leaks.identical[0]),
                                   min_name_distance=float(leaks.min_distance[0]))
    save_table(df, out, name)
    print(df.to_string())


if __name__ == "__main__":
    main()
