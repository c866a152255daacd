"""Tests of ant_nb.method.erase: all methods run, the input is untouched, exact resume after SIGKILL, NaN stop, bad inputs."""
import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import ant_nb.method.erase as erase_mod
from ant_nb.base.model import load_model
from ant_nb.method.erase import erase_concept, erase_defaults, erase_or_load
from ant_nb.method.losses import AntLossConfig
from ant_nb.base.files import LOCK_FILE
from ant_nb.base.checkpoints import Checkpointer
from ant_nb.method.saliency import save_mask
from _locks import held_by_another_process

CFG = AntLossConfig(num_steps=10, t_prime=8)  # short schedule: cheap trajectories
RUN = dict(iterations=6, lr=1e-3, config=CFG, cache_size=2, checkpoint_every=2, progress=False)
CONCEPT = ["nudity", "naked"]


def _weights(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method", ["ant", "esd-x", "esd-u", "ac"])
def test_methods_train_their_parameters_only(tiny_sd, method):
    before = _weights(tiny_sd.unet)
    out = erase_concept(tiny_sd, CONCEPT, method=method, iterations=2, lr=1e-3, config=CFG, cache_size=1,
                        anchors=["a person"] if method == "ac" else None, progress=False)
    assert _same(_weights(tiny_sd.unet), before)  # input untouched
    after = _weights(out.unet)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved
    if method == "esd-x": assert all("attn2." in n for n in moved)
    if method == "esd-u": assert not any("attn2." in n or n.startswith("time_embedding.") for n in moved)
    if method == "ac": assert all("attn2.to_k." in n or "attn2.to_v." in n for n in moved)
    assert out.text_encoder is tiny_sd.text_encoder and out.unet is not tiny_sd.unet


def test_mask_restricts_updates_and_saved_model_loads(tiny_sd, tmp_path):
    before = _weights(tiny_sd.unet)
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=g) > 0.9 for n, p in tiny_sd.unet.named_parameters()}
    path = save_mask(mask, tmp_path / "mask.safetensors")
    out = erase_concept(tiny_sd, CONCEPT, mask=path, iterations=2, lr=1e-3, config=CFG, cache_size=1,
                        out_dir=tmp_path / "model", progress=False)
    for n, p in out.unet.named_parameters():
        assert not ((p.detach() != before[n]) & ~mask[n]).any(), n
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "model", subfolder="unet")
    assert _same(_weights(unet), _weights(out.unet))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert _same(_weights(pipe.unet), _weights(out.unet))
    assert (tmp_path / "model" / "run.json").is_file()


_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from ant_nb.base.model import load_model
    from ant_nb.method.erase import erase_concept
    from ant_nb.method.losses import AntLossConfig
    def die(step, values):
        if step == 3: os.kill(os.getpid(), signal.SIGKILL)  # after step 3, before its checkpoint would be due
    erase_concept(load_model(sys.argv[1]), ["nudity", "naked"], iterations=6, lr=1e-3,
                  config=AntLossConfig(num_steps=10, t_prime=8), cache_size=2, checkpoint_every=2,
                  checkpoint_dir=sys.argv[2], callback=die, progress=False)
""")


def test_sigkill_then_resume_gives_identical_weights(tiny_sd, tiny_sd_dir, tmp_path):
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_sd_dir), str(tmp_path / "ckpt")],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert Checkpointer(tmp_path / "ckpt").steps() == [2]  # killed half-way, last checkpoint at step 2
    steps = []
    resumed = erase_concept(tiny_sd, CONCEPT, checkpoint_dir=tmp_path / "ckpt", resume=True,
                            callback=lambda s, v: steps.append(s), **RUN)
    assert steps == [3, 4, 5, 6]
    straight = erase_concept(tiny_sd, CONCEPT, **RUN)
    assert _same(_weights(resumed.unet), _weights(straight.unet))
    # resuming a finished run trains nothing and returns the final weights
    again = erase_concept(tiny_sd, CONCEPT, checkpoint_dir=tmp_path / "ckpt", resume=True, **RUN)
    assert _same(_weights(again.unet), _weights(straight.unet))


def test_checkpoint_folder_is_never_mixed(tiny_sd, tmp_path):
    erase_concept(tiny_sd, CONCEPT, checkpoint_dir=tmp_path / "c", **{**RUN, "iterations": 2})
    with pytest.raises(FileExistsError, match="checkpoint_dir"):
        erase_concept(tiny_sd, CONCEPT, checkpoint_dir=tmp_path / "c", **{**RUN, "iterations": 2})
    with pytest.raises(ValueError, match="lr"):
        erase_concept(tiny_sd, CONCEPT, checkpoint_dir=tmp_path / "c", resume=True, **{**RUN, "iterations": 2, "lr": 1e-2})


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_sd, tmp_path, monkeypatch):
    real, calls = erase_mod.method_loss, []
    def flaky(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) == 4 else (loss, parts)
    monkeypatch.setattr(erase_mod, "method_loss", flaky)
    with pytest.raises(FloatingPointError, match="iteration 4.*step 2"):
        erase_concept(tiny_sd, CONCEPT, checkpoint_dir=tmp_path / "c", **RUN)
    ckpt = Checkpointer(tmp_path / "c")
    assert ckpt.steps() == [2]


BAD = [  # (kwargs, error type, word the message must contain)
    (dict(method="esd"), ValueError, "method"), (dict(method=None), ValueError, "method"),
    (dict(concept=[]), ValueError, "concept"), (dict(concept="nudity"), TypeError, "concept"),
    (dict(concept=["nudity", "nudity"]), ValueError, "concept"), (dict(concept=["nudity", ""]), ValueError, "concept"),
    (dict(concept=["nudity", 3]), ValueError, "concept"),
    (dict(lr=0.0), ValueError, "lr"), (dict(lr=-1e-4), ValueError, "lr"), (dict(lr=float("inf")), ValueError, "lr"),
    (dict(iterations=0), ValueError, "iterations"), (dict(iterations=2.5), ValueError, "iterations"),
    (dict(seed=-1), ValueError, "seed"), (dict(batch_size=0), ValueError, "batch_size"),
    (dict(cache_size=-2), ValueError, "cache_size"), (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every"), (dict(preset="violence"), ValueError, "preset"),
    (dict(resume=True), ValueError, "resume"), (dict(config="paper"), TypeError, "config"),
    (dict(mask={"conv_in.weight": torch.ones(1, dtype=torch.bool)}), ValueError, "mask"),
    (dict(mask="/nonexistent/mask.safetensors"), FileNotFoundError, "mask"),
    (dict(anchors=[]), ValueError, "anchors"), (dict(model="toy"), TypeError, "model"),
]


@pytest.mark.parametrize("kwargs,error,word", BAD)
def test_bad_inputs_fail_before_work(tiny_sd, kwargs, error, word, monkeypatch):
    monkeypatch.setattr(erase_mod, "TrajectoryLatents", lambda *a, **k: pytest.fail("work started"))
    args = {"model": tiny_sd, "concept": ["nudity"], **kwargs}
    with pytest.raises(error, match=word): erase_concept(**args)


def test_out_dir_is_not_overwritten(tiny_sd, tmp_path):
    (tmp_path / "out").mkdir(); (tmp_path / "out" / "keep.txt").write_text("results")
    with pytest.raises(FileExistsError, match="out_dir"):
        erase_concept(tiny_sd, CONCEPT, out_dir=tmp_path / "out", **RUN)


def test_defaults_follow_table6():
    d = erase_defaults("ant", "nudity")
    assert (d["lr"], d["iterations"], d["config"].t_prime, d["config"].lambda1) == (5e-4, 250, 43, 1.0)
    assert erase_defaults("ant", "art")["config"].t_prime == 47
    assert erase_defaults("esd-u", "nudity")["iterations"] == 1000


def test_erase_or_load_trains_once_and_refuses_other_parameters(tiny_sd, tmp_path, monkeypatch):
    kw = dict(iterations=2, lr=1e-3, config=CFG, cache_size=1, progress=False)
    a = erase_or_load(tiny_sd, CONCEPT, tmp_path / "m", method="esd-x", **kw)
    rec = json.loads((tmp_path / "m" / "run.json").read_text())
    assert rec["params"]["method"] == "esd-x" and len(rec["losses"]) == 2
    monkeypatch.setattr(erase_mod, "erase_concept", lambda *a, **k: pytest.fail("trained again"))
    b = erase_or_load(tiny_sd, CONCEPT, tmp_path / "m", method="esd-x", **kw)
    assert _same(_weights(a.unet), _weights(b.unet))
    with pytest.raises(ValueError, match="method"): erase_or_load(tiny_sd, CONCEPT, tmp_path / "m", method="esd-u", **kw)
    with pytest.raises(TypeError, match="unexpected"): erase_or_load(tiny_sd, CONCEPT, tmp_path / "m", out_dir="x", **kw)
    with torch.no_grad(): tiny_sd.unet.conv_in.bias.add_(1e-3)  # "the same model", retrained: never reused
    with pytest.raises(ValueError, match="model"): erase_or_load(tiny_sd, CONCEPT, tmp_path / "m", method="esd-x", **kw)


def test_shared_trajectories_are_checked(tiny_sd):
    from ant_nb.method.trajectories import TrajectoryLatents
    lat = TrajectoryLatents(tiny_sd, CONCEPT, cache_size=1, num_steps=10, progress=False)
    a = erase_concept(tiny_sd, CONCEPT, iterations=1, lr=1e-3, config=CFG, trajectories=lat, progress=False)
    assert a.unet is not tiny_sd.unet
    with pytest.raises(ValueError, match="trajectories"):
        erase_concept(tiny_sd, ["nudity"], iterations=1, lr=1e-3, config=CFG, trajectories=lat, progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["ant", "esd-u", "ac"])
def test_half_precision_model_trains_a_float32_copy(tiny_sd_dir, dtype, method):
    "A model loaded in half precision (as on a GPU: UNet and text encoder) trains, and its erased copy samples."
    from ant_nb.base.sampling import sample
    half = load_model(str(tiny_sd_dir), dtype=dtype)
    out = erase_concept(half, CONCEPT, method, iterations=2, lr=1e-3, config=CFG, cache_size=1, progress=False)
    assert out.unet.dtype == torch.float32 and half.unet.dtype == getattr(torch, dtype)
    assert out.text_encoder.dtype == getattr(torch, dtype)
    images = sample(out, ["a photo of nudity"], [0], num_steps=2, progress=False)
    assert images.shape[0] == 1 and images.dtype == np.uint8


@pytest.mark.parametrize("which", ["out_dir", "checkpoint_dir", "erase_or_load"])
def test_locked_folder_fails_at_once_and_stale_lock_is_taken_over(tiny_sd, tmp_path, which):
    folder = tmp_path / which
    run = ((lambda: erase_or_load(tiny_sd, CONCEPT, folder, **{**RUN, "iterations": 2, "checkpoint_every": 50}))
           if which == "erase_or_load" else lambda: erase_concept(tiny_sd, CONCEPT, **{which: folder}, **RUN))
    with held_by_another_process(folder) as pid:
        with pytest.raises(RuntimeError, match=rf"{folder}.*process {pid}"): run()
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]  # nothing written
    run()  # the lock names a process that is gone: stale, taken over
    assert not (folder / LOCK_FILE).exists() and any(folder.iterdir())
