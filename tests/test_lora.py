"""Per-concept LoRAs: peft attach, diffusers round trip, delta read-back, training, SIGKILL-and-resume, NaN stop."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ant_nb.base.model import encode_prompts
from ant_nb.method.losses import AntLossConfig
from ant_nb.method.lora import (LORA_FILE, LoraSettings, add_lora, concept_prompts, is_trained, lora_deltas,
                                make_loss, save_lora, train_concept_lora)
from ant_nb.method.train import finetune
from _locks import held_by_another_process

ROOT = Path(__file__).resolve().parents[1]


def _loss_for(model):
    "A loss with a known optimum: the prompt's prediction should match the frozen empty-prompt prediction."
    cond, uncond = encode_prompts(model, ["x ab y"]), encode_prompts(model, [""])
    def loss_fn(unet, gen):
        z = torch.randn(1, 4, 8, 8, generator=gen)
        t = int(torch.randint(100, 900, (1,), generator=gen))
        with torch.no_grad(): target = model.unet(z, t, uncond).sample
        return ((unet(z, t, cond).sample - target) ** 2).mean()
    return loss_fn


def test_templates_and_settings():
    assert concept_prompts("Tom Hanks")[0] == "a portrait of Tom Hanks"
    assert all("vanter" in p for p in concept_prompts("vanter", "toy-style"))
    with pytest.raises(ValueError, match="kind"): concept_prompts("x", "poems")
    with pytest.raises(ValueError, match="kind"): concept_prompts("x", ["no placeholder"])
    with pytest.raises(ValueError, match="concept"): concept_prompts("  ")
    with pytest.raises(ValueError, match="rank"): LoraSettings(rank=0)
    with pytest.raises(ValueError, match="alpha"): LoraSettings(alpha=-1.0)
    with pytest.raises(ValueError, match="target_modules"): LoraSettings(target_modules="attn2.to_k")


def test_round_trip_with_pipeline(tiny_sd, tiny_sd_dir, tmp_path):
    "save_lora writes what StableDiffusionPipeline.load_lora_weights loads; lora_deltas equals peft's ΔW (alpha ≠ rank)."
    from diffusers import StableDiffusionPipeline
    unet = tiny_sd.unet
    params = add_lora(unet, LoraSettings(rank=2, alpha=8.0, target_modules=("attn2.to_k", "attn2.to_v", "attn1.to_q")))
    with torch.no_grad():
        for p in params: p.normal_(generator=torch.Generator().manual_seed(3))
    save_lora(unet, tmp_path / "lora")
    deltas = lora_deltas(tmp_path / "lora")
    mods = dict(unet.named_modules())
    assert any(".attn1.to_q" in n for n in deltas) and len(deltas) == len(params) // 2
    for n, d in deltas.items(): torch.testing.assert_close(d, mods[n].get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "lora")
    x, emb = torch.randn(2, 4, 8, 8), encode_prompts(tiny_sd, ["x ab y", "cd"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 300, emb).sample, unet(x, 300, emb).sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="path"): lora_deltas(tmp_path / "nothing")
    with pytest.raises(ValueError, match="adapter_name"): save_lora(unet, tmp_path / "x", adapter_name="other")


def test_training_reduces_loss_and_writes_folder(tiny_sd, tmp_path):
    out = train_concept_lora(tiny_sd, "ab", ["x ab y"], tmp_path / "ab", _loss_for(tiny_sd), settings=LoraSettings(rank=2),
                             steps=24, lr=1e-2, checkpoint_every=8, progress=False)
    rec = json.loads((out / "lora.json").read_text())
    assert len(rec["losses"]) == 24 and sum(rec["losses"][-6:]) < sum(rec["losses"][:6])
    assert sorted(p.name for p in out.iterdir()) == ["lora.json", LORA_FILE] and is_trained(out)
    assert all(not torch.equal(d, torch.zeros_like(d)) for d in lora_deltas(out).values())
    assert train_concept_lora(tiny_sd, "ab", ["x ab y"], out, _loss_for(tiny_sd), steps=24) == out  # finished: kept
    with pytest.raises(FileExistsError, match="folder"):
        train_concept_lora(tiny_sd, "ab", ["x ab y"], out, _loss_for(tiny_sd), steps=24, resume=False)


_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from ant_nb.base.model import load_model
    from ant_nb.method.lora import LoraSettings, train_concept_lora
    from test_lora import _loss_for
    model = load_model({model!r})
    inner, calls = _loss_for(model), [0]
    def loss_fn(unet, gen):
        calls[0] += 1
        if calls[0] == 14: os.kill(os.getpid(), signal.SIGKILL)  # killed half-way through step 14 of 24
        return inner(unet, gen)
    train_concept_lora(model, "ab", ["x ab y"], {out!r}, loss_fn, settings=LoraSettings(rank=2), steps=24, lr=1e-2,
                       checkpoint_every=8, progress=False)
""")


def test_sigkill_and_resume_gives_identical_weights(tiny_sd, tiny_sd_dir, tmp_path):
    child = _CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), model=str(tiny_sd_dir), out=str(tmp_path / "killed"))
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not is_trained(tmp_path / "killed") and (tmp_path / "killed" / "checkpoints" / "step-8").is_dir()
    resumed = train_concept_lora(tiny_sd, "ab", ["x ab y"], tmp_path / "killed", _loss_for(tiny_sd),
                                 settings=LoraSettings(rank=2), steps=24, lr=1e-2, checkpoint_every=8, progress=False)
    straight = train_concept_lora(tiny_sd, "ab", ["x ab y"], tmp_path / "straight", _loss_for(tiny_sd),
                                  settings=LoraSettings(rank=2), steps=24, lr=1e-2, checkpoint_every=8, progress=False)
    a, b = lora_deltas(resumed), lora_deltas(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((resumed / "lora.json").read_text())["losses"]
    assert la == json.loads((straight / "lora.json").read_text())["losses"]


def test_nan_loss_stops_and_keeps_checkpoint(tiny_sd, tmp_path):
    inner, calls = _loss_for(tiny_sd), [0]
    def loss_fn(unet, gen):
        calls[0] += 1
        v = inner(unet, gen)
        return v * float("nan") if calls[0] == 7 else v
    with pytest.raises(FloatingPointError, match="iteration 7 .*step 5"):  # the 7th loss is NaN; checkpoint at 5
        train_concept_lora(tiny_sd, "ab", ["x ab y"], tmp_path / "nan", loss_fn, settings=LoraSettings(rank=2),
                           steps=10, lr=1e-2, checkpoint_every=5, progress=False)
    assert (tmp_path / "nan" / "checkpoints" / "step-5").is_dir() and not is_trained(tmp_path / "nan")


def test_bad_training_inputs(tiny_sd, tmp_path):
    f = _loss_for(tiny_sd)
    cases = [(dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(loss="mace"), "loss"),
             (dict(prompts=[]), "prompts"), (dict(prompts=["a", "a"]), "prompts"), (dict(concept=""), "concept"),
             (dict(checkpoint_every=0), "checkpoint_every")]
    for change, name in cases:
        kw = dict(model=tiny_sd, concept="ab", prompts=["x ab y"], folder=tmp_path / "bad", loss=f, progress=False) | change
        with pytest.raises(ValueError, match=name): train_concept_lora(**kw)
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(tiny_sd.unet, LoraSettings(target_modules=("attn9.to_k",)))
    with pytest.raises(ValueError, match="params"): finetune(f, tiny_sd.unet, {}, tmp_path / "c", 2, 1e-3)


@pytest.mark.parametrize("method", ["ant", "esd"])
def test_paper_losses_plug_in(tiny_sd, tmp_path, method):
    cfg = AntLossConfig(t_prime=3, num_steps=5)
    loss_fn = make_loss(tiny_sd, ["x ab y", "ab z"], method, cfg, cache_size=2)
    out = train_concept_lora(tiny_sd, "ab", ["x ab y", "ab z"], tmp_path / method, loss_fn, settings=LoraSettings(rank=2),
                             steps=3, progress=False)
    assert all(torch.isfinite(torch.tensor(json.loads((out / "lora.json").read_text())["losses"])))
    with pytest.raises(ValueError, match="method"): make_loss(tiny_sd, ["x ab y"], "ac", cfg)


def test_lora_folder_is_locked_while_trained(tiny_sd, tmp_path):
    "Another live process's lock on the folder stops the run at once, naming folder and pid; a dead one's is taken over."
    folder = tmp_path / "ab"
    with held_by_another_process(folder) as pid:
        with pytest.raises(RuntimeError, match=rf"{folder}.*process {pid}"):
            train_concept_lora(tiny_sd, "ab", ["x ab y"], folder, _loss_for(tiny_sd), steps=2, progress=False)
        assert not (folder / "checkpoints").exists()
    train_concept_lora(tiny_sd, "ab", ["x ab y"], folder, _loss_for(tiny_sd), settings=LoraSettings(rank=2), steps=2,
                       progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["lora.json", LORA_FILE]  # lock released with the run
