"""Multi-concept erasure: methods, resume, bad-input table, image generation, 2-process sharding."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ant_nb.method.fusion import GramCache, closed_form_fuse
from ant_nb.method.lora import LoraSettings, lora_deltas
from ant_nb.method.losses import AntLossConfig
from ant_nb.method.mace import MaceSettings
from ant_nb.method.edits import EDIT_FILE, FusionSettings, load_edit
from ant_nb.method.multi import erase_concepts
from ant_nb.method.presets import MULTI_METHODS
from ant_nb.base.files import LOCK_FILE
from _locks import held_by_another_process

ROOT = Path(__file__).resolve().parents[1]
TINY_MACE = MaceSettings(templates=("{} x", "x {} y"), image_prompts=("{} x",), n_images=1, sample_steps=2, steps=2,
                         lamb=1e-3)  # λ > 0: the tiny encoder's 32 dimensions leave MACE's λ = 0 solve singular
KW = dict(templates=["{} x", "x {} y"], prior_prompts=["gh ij", "kl", "mn op q"], steps=3, cache_size=2, mace=TINY_MACE,
          loss_config=AntLossConfig(t_prime=3, num_steps=5, lambda1=0.4, lambda2=0.5, lambda3=0.2), progress=False)


@pytest.mark.parametrize("method", MULTI_METHODS)
def test_each_method_edits_only_cross_attention(tiny_sd, tmp_path, method):
    base = {n: p.detach().clone() for n, p in tiny_sd.unet.named_parameters()}
    out = erase_concepts(tiny_sd, ["ab", "cd"], ["ef"], method, tmp_path / method, lr={"esd-x": 2e-5}, **KW)
    changed = [n for n, p in out.unet.named_parameters() if not torch.equal(p, base[n])]
    assert changed and all(".attn2." in n for n in changed)
    assert all(torch.equal(p, base[n]) for n, p in tiny_sd.unet.named_parameters())  # input model untouched
    run = json.loads((tmp_path / method / "run.json").read_text())
    assert run["params"]["method"] == method and run["params"]["concepts"] == ["ab", "cd"] and "git_commit" in run
    assert run["params"]["lr"] == (2e-5 if method == "esd-x" else 5e-4)  # {method: lr}, else the method's default
    if method.endswith("fusion"):
        assert sorted(p.name for p in (tmp_path / method / "loras").iterdir()) == ["000-ab", "001-cd"]
        assert (tmp_path / method / "cache" / "prior.safetensors").is_file()


def test_fusion_method_equals_manual_fusion(tiny_sd, tmp_path):
    "ant-fusion's edit is closed_form_fuse of its own LoRAs with the cached preservation Grams, layer by layer."
    from ant_nb.method.fusion import kv_projections, token_embeddings
    fs = FusionSettings(beta_prior=0.5, beta_domain=2.0, lamb=0.1)
    out = erase_concepts(tiny_sd, ["ab", "cd"], ["ef"], "ant-fusion", tmp_path / "run", fusion=fs, **KW)
    prior = GramCache.load(tmp_path / "run" / "cache" / "prior.safetensors")
    domain = GramCache.load(tmp_path / "run" / "cache" / "domain.safetensors")
    deltas = [lora_deltas(tmp_path / "run" / "loras" / f) for f in ("000-ab", "001-cd")]
    embs = [token_embeddings(tiny_sd, [t.format(c) for t in KW["templates"]], c) for c in ("ab", "cd")]
    fused = dict(out.unet.named_parameters())
    for name, layer in kv_projections(tiny_sd.unet).items():
        g = prior.gram * 0.5 + domain.gram * 2.0
        both = GramCache(32); both.gram, both.count = g, 1
        want = closed_form_fuse(layer.weight, [d[name] for d in deltas], embs, both, beta=1.0, lamb=0.1)
        torch.testing.assert_close(fused[name + ".weight"], want, rtol=1e-5, atol=1e-5)


def test_resume_and_folder_protection(tiny_sd, tmp_path):
    first = erase_concepts(tiny_sd, ["ab", "cd"], [], "mace-fusion", tmp_path / "run", **KW)
    (tmp_path / "run" / EDIT_FILE).unlink()  # as if killed after training the LoRAs, before fusing
    t0 = time.time()
    again = erase_concepts(tiny_sd, ["ab", "cd"], [], "mace-fusion", tmp_path / "run", **KW)  # reuses both LoRAs
    assert all(torch.equal(p, q) for p, q in zip(first.unet.parameters(), again.unet.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(first.unet.parameters(), load_edit(tiny_sd, tmp_path / "run").unet.parameters()))
    with pytest.raises(ValueError, match="steps"):
        erase_concepts(tiny_sd, ["ab", "cd"], [], "mace-fusion", tmp_path / "run", **{**KW, "steps": 4})
    with pytest.raises(FileExistsError, match="overwrite"):
        erase_concepts(tiny_sd, ["ab", "cd"], [], "mace-fusion", tmp_path / "run", resume=False, **KW)
    erase_concepts(tiny_sd, ["ab"], [], "uce", tmp_path / "run", overwrite=True, **KW)
    assert not (tmp_path / "run" / "loras").exists()


def test_run_folder_is_locked_while_written(tiny_sd, tmp_path):
    "A folder another live process holds is refused at once, naming it and the process; a dead holder's lock is taken over."
    folder = tmp_path / "run"
    with held_by_another_process(folder) as pid:
        t0 = time.time()
        with pytest.raises(RuntimeError, match=rf"{folder}.*process {pid}"):
            erase_concepts(tiny_sd, ["ab"], [], "uce", folder, **KW)
        assert time.time() - t0 < 5 and not (folder / "manifest.json").exists()  # failed at once, wrote nothing
    erase_concepts(tiny_sd, ["ab"], [], "uce", folder, **KW)  # the lock is stale now: taken over
    assert (folder / EDIT_FILE).is_file() and not (folder / LOCK_FILE).exists()
    erase_concepts(tiny_sd, ["ab", "cd"], [], "uce", folder, overwrite=True, **KW)  # overwrite keeps the folder locked
    assert json.loads((folder / "run.json").read_text())["params"]["concepts"] == ["ab", "cd"]


def _bad_cases(tmp_path):
    "(kwargs changes, error type, parameter the message must name)."
    return [
        (dict(method="fusion"), ValueError, "method"),
        (dict(method="ESD-x"), ValueError, "method"),
        (dict(concepts=[]), ValueError, "concepts"),
        (dict(concepts=["ab", "ab"]), ValueError, "concepts"),
        (dict(concepts="ab"), TypeError, "concepts"),
        (dict(concepts=["ab", ""]), ValueError, "concepts"),
        (dict(preserve=["ab"]), ValueError, "preserve"),
        (dict(preserve=["ef", "ef"]), ValueError, "preserve"),
        (dict(templates="cartoon"), ValueError, "templates"),
        (dict(templates=["no placeholder"]), ValueError, "kind"),
        (dict(templates=["a very long template that truncates {}"]), ValueError, "concept"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1e-4), ValueError, "lr"),
        (dict(cache_size=0), ValueError, "cache_size"),
        (dict(lora=LoraSettings(target_modules=("attn1.to_q",))), ValueError, "target_modules"),
        (dict(lora="rank 4"), TypeError, "lora"),
        (dict(fusion={"lamb": 1}), TypeError, "fusion"),
        (dict(loss_config={"t_prime": 3}), TypeError, "loss_config"),
        (dict(prior_prompts=str(tmp_path / "missing.safetensors")), FileNotFoundError, "prior_prompts"),
        (dict(prior_prompts=[]), ValueError, "prior_prompts"),
    ]


def test_bad_input_table(tiny_sd, tmp_path):
    cases = _bad_cases(tmp_path)
    assert len(cases) >= 20
    for change, err, name in cases:
        kw = dict(model=tiny_sd, concepts=["ab", "cd"], preserve=["ef"], method="ant-fusion",
                  out_dir=tmp_path / "never") | KW | change
        with pytest.raises(err, match=name): erase_concepts(**kw)
    assert not (tmp_path / "never").exists()  # nothing was written before the checks
    settings = [(dict(lamb=-1.0), "lamb"), (dict(beta_prior=-0.1), "beta_prior"), (dict(beta_domain=float("inf")), "beta_domain"),
                (dict(positions="middle"), "positions")]
    for change, name in settings:
        with pytest.raises(ValueError, match=name): FusionSettings(**change)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sharding(tiny_sd, tiny_sd_dir, tmp_path):
    "torchrun with 2 CPU processes: LoRAs split by concept, images by prompt; same edit as one process."
    (tmp_path / "prior.txt").write_text("gh ij\nkl\nmn op q\n")
    pd.DataFrame(dict(prompt=["ab x", "cd x", "ef", "gh"], evaluation_seed=[1, 2, 3, 4])).to_csv(tmp_path / "eval.csv", index=False)
    args = ["--model", str(tiny_sd_dir), "--device", "cpu", "--method", "ant-fusion", "--concepts", "ab", "cd",
            "--preserve", "ef", "--templates", "{} x|x {} y", "--prior-file", str(tmp_path / "prior.txt"),
            "--num-steps", "5", "--t-prime", "3", "--steps", "3", "--cache-size", "2",
            "--generate-csv", str(tmp_path / "eval.csv"), "--sample-steps", "2", "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "ant_nb.method.multi", *args, "--out", str(tmp_path / "dist")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "process 0/2: training LoRAs for ['ab']" in log and "process 1/2: training LoRAs for ['cd']" in log
    from ant_nb.base.images import load_images
    assert load_images(tmp_path / "dist" / "images").shape == (4, 16, 16, 3)
    cfg = AntLossConfig(t_prime=3, num_steps=5, lambda1=0.4, lambda2=0.5, lambda3=0.2)
    one = erase_concepts(tiny_sd, ["ab", "cd"], ["ef"], "ant-fusion", tmp_path / "one", templates=["{} x", "x {} y"],
                         prior_prompts=["gh ij", "kl", "mn op q"], loss_config=cfg, steps=3, cache_size=2, progress=False)
    two = load_edit(tiny_sd, tmp_path / "dist")
    for p, q in zip(one.unet.parameters(), two.unet.parameters()): torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
