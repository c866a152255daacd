"""The SD-1.4-sized rehearsal of a user's first real run of nbs/20_nsfw.ipynb, on the CPU, with time and peak memory
per stage.

What a first GPU run (`papermill nbs/20_nsfw.ipynb -p model_id CompVis/stable-diffusion-v1-4 -p backend real ...`)
does, at the real sizes: an SD-v1.4-shaped pipeline built from SD v1.4's configs with random weights (860 M UNet,
123 M CLIP ViT-L/14 text encoder, 84 M VAE; `real_configs.build_sd14`), 64x64 latents and 512x512 images, NudeNet as
shipped (its ONNX model is in the wheel), the real I2P and COCO-30k prompt files; CLIP and FID, whose real weights
need the hub, with a tiny random CLIP (`ant_nb.base.testing.tiny_clip`) for the CLIP score and for FID's features
(`-p fid_features clip`), against random "photos" named by the captions' COCO ids. The notebook runs at the smallest
sizes that still pass every stage: 2 I2P prompts, 2 COCO captions, 2 erasure iterations, 2 sampling steps (training
trajectories keep the paper's T = 50: they are what the losses are defined on).

Which methods: ESD-x and AC (cross-attention weights). ANT on the full UNet and ESD-u train (nearly) every UNet weight:
a float32 copy with gradients and Adam's two states is 4 x 3.44 GB next to the frozen 3.44 GB UNet, plus the
activations of the batch-4 ANT call (~2 GB per sample, measured): ~25 GB (ANT) and ~19 GB (ESD-u), beyond this
machine's 23 GB, shared with other jobs. The ANT loss's gradient over the whole UNet does run, in the saliency maps of
Figure 4 (Eq. 3 at theta*, batch 4, forward and backward: an ANT step without Adam).

Time and memory: papermill runs with --log-output; its cell starts and the notebook's progress lines ("[  12 s] ESD-x:
training ...") cut the run into stages; a sampler thread reads the resident set size (RSS) of the kernel process every
0.5 s. Usage: python tests/bench/sd14_rehearsal.py [--work DIR] [--tiny]   (--tiny: the tiny SD pipeline, a smoke run)
Writes outputs/bench/sd14_rehearsal.md and .csv (or sd14_rehearsal_tiny.*).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image

from ant_nb.base.files import project_path
from ant_nb.base.report import markdown_table, save_table

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent/"shared"/"data"
GIB = 2**30


class RssSampler(threading.Thread):
    "Samples the RSS of a process and its children (GiB) every `every` seconds: [(time, kernel_max, tree_total)]."
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.proc, self.every, self.samples, self.stop = psutil.Process(pid), every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try: procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.NoSuchProcess: break
            rss = []
            for p in procs:
                try: rss.append(p.memory_info().rss / GIB)
                except psutil.NoSuchProcess: pass
            if rss: self.samples.append((time.time(), max(rss), sum(rss)))
            time.sleep(self.every)

    def peak(self, t0: float, t1: float) -> tuple[float, float]:
        "Peak (largest single process, whole tree) RSS between t0 and t1."
        inside = [(k, s) for t, k, s in self.samples if t0 <= t <= t1]
        return (max(k for k, _ in inside), max(s for _, s in inside)) if inside else (float("nan"), float("nan"))


def measured(label: str, rows: list, fn):
    "Run fn() in this process, appending (stage, seconds, peak RSS) of this process."
    sampler = RssSampler(os.getpid())
    sampler.start()
    t0 = time.time()
    out = fn()
    t1 = time.time()
    sampler.stop.set(); sampler.join()
    rows.append(dict(stage=label, seconds=round(t1 - t0, 1), peak_rss_gib=round(sampler.peak(t0, t1)[0], 2)))
    return out


def prepare(work: Path, tiny: bool, rows: list) -> dict:
    "The model folder, tiny CLIP folder and reference photos; their parameters for the notebook."
    from ant_nb.base.testing import build_tiny_sd, tiny_clip
    from ant_nb.evaluate.data import load_coco
    from real_configs import build_sd14
    folder = work/("tiny-sd" if tiny else "sd14")
    if not (folder/"model_index.json").exists():
        measured("build the SD-1.4-shaped pipeline from configs and save it (float32)" if not tiny else
                 "build the tiny SD pipeline", rows, lambda: (build_tiny_sd if tiny else build_sd14)(folder))
    clip_dir = work/"tiny-clip"
    model, proc = tiny_clip()
    model.save_pretrained(clip_dir); proc.save_pretrained(clip_dir)
    photos, rng = work/"photos", np.random.default_rng(0)
    photos.mkdir(exist_ok=True)
    for coco_id in load_coco(DATA/"coco_30k.csv").head(2).coco_id:
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(photos/f"{coco_id}.png")
    return dict(model_id=str(folder), clip_model=str(clip_dir), coco_images=str(photos))


PARAMS = dict(device="cpu", threads=1, preset="paper", backend="real", fid_features="clip", n_i2p=2, n_coco=2,
              concept=["nudity", "naked"], methods=["esd-x", "ac"], mask_seeds=[24], iterations=2, cache_size=1,
              table5=False, stage_ablation=False, figure4_extra=False, eval_steps=2, batch_size=2)


def run_notebook(work: Path, params: dict, rows: list) -> Path:
    "papermill 20_nsfw with `params`, cut into stages at cell starts and progress lines; rows of time and peak RSS."
    out_nb, log = work/"20_nsfw_rehearsal.ipynb", work/"papermill.log"
    params = dict(PARAMS, **params, i2p_csv=str(DATA/"I2P_prompts_4703.csv"), coco_csv=str(DATA/"coco_30k.csv"),
                  out_dir=str(work/"20_nsfw"), overwrite=True)
    cells = json.loads((ROOT/"nbs"/"20_nsfw.ipynb").read_text())["cells"]
    at = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    injected = dict(cell_type="code", source=["# papermill's injected parameters"])
    cells = cells[:at + 1] + [injected] + cells[at + 1:] # papermill numbers the cells of its output notebook
    cmd = [sys.executable, "-m", "papermill", str(ROOT/"nbs"/"20_nsfw.ipynb"), str(out_nb), "--log-output",
           "--cwd", str(ROOT/"nbs"), "-y", json.dumps(params)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
    sampler = RssSampler(proc.pid)
    sampler.start()
    events = [(time.time(), "papermill: start the kernel, read the parameters")]
    with open(log, "w") as f:
        for line in proc.stdout:
            f.write(line)
            if (m := re.search(r"Executing Cell (\d+)-", line)) and cells[int(m.group(1)) - 1]["cell_type"] == "code":
                src = "".join(cells[int(m.group(1)) - 1]["source"])
                first = next((s for s in src.splitlines() if s.strip() and not s.startswith("#|")), "")
                events.append((time.time(), f"cell {m.group(1)}: {first[:70]}"))
            elif m := re.search(r"\[\s*\d+ s\] (.*)$", line):
                events.append((time.time(), "  " + m.group(1).strip()[:100]))
    rc = proc.wait()
    events.append((time.time(), "end"))
    sampler.stop.set(); sampler.join()
    for (t0, label), (t1, _) in zip(events, events[1:]):
        kernel, tree = sampler.peak(t0, t1)
        rows.append(dict(stage=label, seconds=round(t1 - t0, 1), peak_rss_gib=round(kernel, 2),
                         peak_rss_all_gib=round(tree, 2)))
    if rc: raise RuntimeError(f"papermill failed (exit {rc}); see {log}")
    return work/"20_nsfw"


def report(rows: list, out_dir: Path, work_out: Path, tiny: bool, seconds: float) -> Path:
    "outputs/bench/sd14_rehearsal.md / .csv: stages, then the machine, the settings and what the run wrote."
    df = pd.DataFrame(rows)
    name = "sd14_rehearsal" + ("_tiny" if tiny else "")
    save_table(df, out_dir, name)
    run = json.loads((work_out/"run.json").read_text())
    table1 = (work_out/"table1.md").read_text() if (work_out/"table1.md").exists() else ""
    head = [f"# 20_nsfw rehearsal at SD-1.4 size on the CPU{' (tiny smoke run)' if tiny else ''}", "",
            f"Machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores (1 torch thread), "
            f"{psutil.virtual_memory().total / GIB:.0f} GiB RAM, shared with other jobs; torch threads 1.",
            f"Total: {seconds / 60:.1f} min. Peak RSS of the kernel: {df.peak_rss_gib.max():.2f} GiB.", "",
            "Notebook parameters: `" + json.dumps({k: v for k, v in PARAMS.items()}) + "` plus the model folder, the "
            "real I2P / COCO-30k files, a tiny random CLIP folder (`clip_model`) and random reference photos "
            "(`coco_images`). Stages: papermill's cell starts and the notebook's progress lines; peak RSS: the "
            "kernel process (largest process; `peak_rss_all_gib`: papermill and kernel together), sampled every 0.5 s.",
            "", markdown_table(df), "", "Table 1 as the run wrote it (random weights: the numbers mean nothing):",
            "", table1, "", f"run.json: {len(run['params'])} parameters recorded, timings_s {run.get('timings_s')}."]
    path = out_dir/f"{name}.md"
    path.write_text("\n".join(head) + "\n")
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None, help="working folder (model, photos, run); default: a temporary one")
    ap.add_argument("--tiny", action="store_true", help="the tiny SD pipeline instead of the SD-1.4-shaped one")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sd14_rehearsal_"))
    work.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    params = prepare(work, args.tiny, rows)
    run_out = run_notebook(work, params, rows)
    path = report(rows, project_path("outputs/bench"), run_out, args.tiny, time.time() - t0)
    print(path.read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
