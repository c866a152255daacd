"""Reliability across the library (issue 7): SIGKILL-and-resume is bit-identical, bad inputs get clear errors,
a NaN/inf loss stops training and keeps the last good checkpoint, and nothing is loaded with pickle."""
import ast
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import ant_nb
import ant_nb.method.erase as erase_mod
from ant_nb.base.model import load_model, save_model
from ant_nb.evaluate.data import load_artist, load_celebrity, load_coco, load_i2p
from ant_nb.method.erase import erase_concept
from ant_nb.method.losses import AntLossConfig
from ant_nb.method.lora import LORA_FILE, LoraSettings, train_concept_lora
from ant_nb.base.checkpoints import Checkpointer
from ant_nb.method.train import finetune
from ant_nb.method.edits import FusionSettings
from ant_nb.method.multi import erase_concepts
from ant_nb.base.images import generate_images as multi_generate_images
from ant_nb.base.checks import check_device
from ant_nb.base.files import run_dir
from ant_nb.method.saliency import saliency_mask, threshold_map
from ant_nb.base.images import generate_images, load_images
from ant_nb.base.sampling import sample
from ant_nb.toy.train import ToyTrainConfig, train_toy_model

PACKAGE = Path(ant_nb.__file__).resolve().parent
# with `pytest -n 2 --dist loadgroup` the kill tests share one worker, hence one runner process (see `runner`)
SIGKILL_GROUP = pytest.mark.xdist_group("sigkill")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# ---------------------------------------------------------------------------------------------------------------
# Kill and resume. The tiny configurations are source text, run both here and in the child process, so that the
# interrupted and the uninterrupted runs cannot drift apart.
CONFIGS = '''
from ant_nb.method.losses import AntLossConfig
from ant_nb.toy.train import ToyTrainConfig
_CFG = AntLossConfig(num_steps=10, t_prime=8)
TOY = ToyTrainConfig(steps=6, batch_size=4, ckpt_every=2, warmup=2, seed=3)
ERASE = dict(concept=["nudity", "naked"], iterations=8, lr=1e-3, config=_CFG, cache_size=2, checkpoint_every=2,
             progress=False)
LORA = dict(concept="ab", prompts=["a ab", "ab b"], loss_config=_CFG, steps=8, cache_size=2, checkpoint_every=2,
            progress=False)
IMAGES = dict(prompts=["a cat", "a dog", "b", "a cat", "cd", "e f", "a", "g"], seeds=list(range(8)), num_steps=8,
              batch_size=2, shard_size=2, progress=False)
'''
exec(CONFIGS)

# The child imports the library once (the slow part) and then forks one worker per job, which the test kills.
# Each worker pauses 0.3 s after every checkpoint / shard, so the test's poll reliably lands mid-run.
_RUNNER = CONFIGS + '''
import json, os, sys, time, traceback
import torch
torch.set_num_threads(1)
import ant_nb.base.checkpoints, ant_nb.base.images
from ant_nb.base.model import load_model
from ant_nb.method.erase import erase_concept
from ant_nb.method.lora import train_concept_lora
from ant_nb.base.images import generate_images
from ant_nb.toy.train import train_toy_model

def _pause_after(owner, name, seconds=0.3):
    f = getattr(owner, name)
    def wrapped(*args, **kwargs):
        out = f(*args, **kwargs)
        time.sleep(seconds)
        return out
    setattr(owner, name, wrapped)

JOBS = dict(
    toy=lambda a: train_toy_model(a["out"], TOY, progress=False),
    erase=lambda a: erase_concept(load_model(a["model"]), checkpoint_dir=a["out"], **ERASE),
    lora=lambda a: train_concept_lora(load_model(a["model"]), folder=a["out"], **LORA),
    images=lambda a: generate_images(load_model(a["model"]), folder=a["out"], **IMAGES))

for line in sys.stdin:
    job, args = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(2, 1)  # the worker's prints go to stderr: stdout carries only the runner's protocol
            torch.set_num_threads(1)
            _pause_after(ant_nb.base.checkpoints.Checkpointer, "save"); _pause_after(ant_nb.base.images, "_save_shard")
            JOBS[job](args)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
'''


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    "A `python -c` child process that runs training jobs in forked workers and reports (pid, wait status)."
    log = tmp_path_factory.mktemp("runner") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, bufsize=0, env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.log = log
    yield proc
    proc.kill()  # it holds no state; this skips its slow interpreter shutdown
    proc.wait(timeout=60)


def _line(proc) -> str:
    out = proc.stdout.readline().decode()
    assert out, f"the runner died:\n{proc.log.read_text()[-3000:]}"
    return out.strip()


def kill_when(proc, job: str, args: dict, ready, timeout: float = 120.0) -> None:
    "Start `job` in the runner, wait until `ready()` is true, SIGKILL the worker and check that it died of it."
    proc.stdin.write((json.dumps([job, args]) + "\n").encode())
    pid, t0 = int(_line(proc)), time.time()
    while not ready():
        finished = select.select([proc.stdout], [], [], 0)[0]
        assert not finished, f"{job} ended before the kill:\n{proc.log.read_text()[-3000:]}"
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{job}: no mid-run checkpoint after {timeout} s")
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    status = int(_line(proc))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{job}: wait status {status}"


def _steps(folder) -> list[int]:
    return Checkpointer(folder).steps()


def _half_way(folder, total: int):
    "True once a checkpoint at or after half of `total` steps exists (and before the last one)."
    return lambda: any(total // 2 <= s < total for s in _steps(folder))


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@SIGKILL_GROUP
def test_toy_training_sigkill_resume_is_bit_identical(runner, tmp_path):
    killed, full = tmp_path / "killed", tmp_path / "full"
    train_toy_model(full, TOY, progress=False)  # uninterrupted (first: the runner starts meanwhile)
    kill_when(runner, "toy", dict(out=str(killed)), _half_way(killed / "checkpoints", TOY.steps))
    assert max(_steps(killed / "checkpoints")) < TOY.steps
    train_toy_model(killed, TOY, resume=True, progress=False)
    for part in ("unet", "text_encoder", "ema_unet", "ema_text_encoder"):
        name = f"step-{TOY.steps}/weights-{part}.safetensors"
        _assert_same_tensors(load_file(killed / "checkpoints" / name), load_file(full / "checkpoints" / name))


@SIGKILL_GROUP
def test_erase_concept_sigkill_resume_is_bit_identical(runner, tiny_sd, tiny_sd_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    full = erase_concept(tiny_sd, checkpoint_dir=tmp_path / "full", **ERASE)
    kill_when(runner, "erase", dict(model=str(tiny_sd_dir), out=str(ckpt)), _half_way(ckpt, ERASE["iterations"]))
    resumed = erase_concept(tiny_sd, checkpoint_dir=ckpt, resume=True, **ERASE)
    _assert_same_tensors(resumed.unet.state_dict(), full.unet.state_dict())
    assert not _same_weights(full.unet, tiny_sd.unet)  # it trained



@SIGKILL_GROUP
def test_lora_training_sigkill_resume_is_bit_identical(runner, tiny_sd, tiny_sd_dir, tmp_path):
    folder = tmp_path / "lora"
    train_concept_lora(tiny_sd, folder=tmp_path / "full", **LORA)
    kill_when(runner, "lora", dict(model=str(tiny_sd_dir), out=str(folder)),
              _half_way(folder / "checkpoints", LORA["steps"]))
    assert not (folder / LORA_FILE).exists()
    train_concept_lora(tiny_sd, folder=folder, resume=True, **LORA)
    _assert_same_tensors(load_file(folder / LORA_FILE), load_file(tmp_path / "full" / LORA_FILE))
    assert json.loads((folder / "lora.json").read_text())["losses"] == \
        json.loads((tmp_path / "full" / "lora.json").read_text())["losses"]


@SIGKILL_GROUP
def test_generate_images_sigkill_resume_gives_same_images(runner, tiny_sd, tiny_sd_dir, tmp_path):
    folder = tmp_path / "images"
    full = generate_images(tiny_sd, folder=tmp_path / "full", **IMAGES)
    n_shards = len(IMAGES["prompts"]) // IMAGES["shard_size"]
    shards = lambda: sorted(folder.glob("shard-*.npy"))
    kill_when(runner, "images", dict(model=str(tiny_sd_dir), out=str(folder)), lambda: len(shards()) >= 2)
    done = {p.name: p.stat().st_mtime_ns for p in shards()}
    assert 2 <= len(done) < n_shards
    images = generate_images(tiny_sd, folder=folder, **IMAGES)
    assert all(p.stat().st_mtime_ns == done[p.name] for p in shards() if p.name in done)  # not generated again
    assert len(shards()) == n_shards and not list(folder.glob(".*.tmp"))
    assert images.dtype == full.dtype and (images == full).all()
    kwargs = {k: IMAGES[k] for k in ("num_steps", "batch_size")}
    assert (full == sample(tiny_sd, IMAGES["prompts"], IMAGES["seeds"], progress=False, **kwargs)).all()


# ---------------------------------------------------------------------------------------------------------------
# A NaN or inf loss stops training with FloatingPointError and keeps the last good checkpoint.
def _poison_after(f, n_good: int, value=float("nan")):
    "Wrap a loss function so that calls after the first `n_good` return `value`."
    calls = []
    def wrapped(*args, **kwargs):
        out = f(*args, **kwargs)
        calls.append(1)
        if len(calls) <= n_good: return out
        if isinstance(out, tuple): return (out[0] * value, *out[1:])
        return out * value
    return wrapped


def test_nan_loss_stops_toy_training_and_keeps_checkpoint(monkeypatch, tmp_path):
    cfg = ToyTrainConfig(steps=4, batch_size=1, ckpt_every=2, warmup=2)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", _poison_after(torch.nn.functional.mse_loss, 3))
    with pytest.raises(FloatingPointError, match=r"(?i)nan at step 3.*checkpoint"):
        train_toy_model(tmp_path, cfg, progress=False)
    assert _steps(tmp_path / "checkpoints") == [2]
    weights = load_file(tmp_path / "checkpoints" / "step-2" / "weights-unet.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    monkeypatch.undo()
    train_toy_model(tmp_path, cfg, progress=False)  # resumes from the good checkpoint
    assert _steps(tmp_path / "checkpoints") == [4]


def test_inf_loss_stops_erase_concept_and_keeps_checkpoint(monkeypatch, tiny_sd, tmp_path):
    monkeypatch.setattr(erase_mod, "method_loss", _poison_after(erase_mod.method_loss, 5, float("inf")))
    kwargs = {**ERASE, "iterations": 6}
    with pytest.raises(FloatingPointError, match=r"inf at iteration 6.*step 4"):
        erase_concept(tiny_sd, checkpoint_dir=tmp_path, **kwargs)
    assert _steps(tmp_path) == [4]
    monkeypatch.undo()
    erased = erase_concept(tiny_sd, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert all(torch.isfinite(p).all() for p in erased.unet.parameters())


def test_nan_loss_stops_lora_finetune_and_keeps_checkpoint(tmp_path):
    net = torch.nn.Linear(3, 1)
    loss_fn = lambda unet, gen: unet(torch.randn(4, 3, generator=gen)).pow(2).mean()
    with pytest.raises(FloatingPointError, match=r"nan at iteration 4 .*step 2"):
        finetune(_poison_after(loss_fn, 3), net, dict(net.named_parameters()), tmp_path, steps=6, lr=0.1,
                 checkpoint_every=2, progress=False)
    assert _steps(tmp_path) == [2]
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "step-2" / "weights-params.safetensors").values())


# ---------------------------------------------------------------------------------------------------------------
# Loading safety: no pickle anywhere in the package.
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def test_no_pickle_loading_in_the_package():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"):
                    problems.append(f"{path.name}:{node.lineno} imports {n}")
        for node, func, kw in _calls(tree):
            where = f"{path.name}:{node.lineno} {ast.unparse(node)[:80]}"
            if func == "torch.load":
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True): problems.append(f"{where}: no weights_only=True")
            if func == "torch.save" and path.name != "checkpoints.py": # the Checkpointer's state.pt: optimizer and generator states
                problems.append(f"{where}: torch.save outside ant_nb.base.checkpoints' Checkpointer (save weights with safetensors)")
            if func.endswith(("read_pickle", "to_pickle")): problems.append(f"{where}: pickle")
            for key in ("allow_pickle", "safe_serialization", "use_safetensors"):
                v = kw.get(key)
                bad = True if key == "allow_pickle" else False
                if isinstance(v, ast.Constant) and v.value is bad: problems.append(f"{where}: {key}={bad}")
    assert not problems, "\n".join(problems)


def test_saved_models_and_checkpoints_hold_no_pickled_weights(tiny_sd_dir, tmp_path):
    files = [p for p in tiny_sd_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert any(p.suffix == ".safetensors" for p in files)
    net, opt = torch.nn.Linear(2, 2), None
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 2)).sum().backward(); opt.step()
    folder = Checkpointer(tmp_path).save(1, {"net": net}, {"opt": opt}, {"g": torch.Generator()})
    assert sorted(p.name for p in folder.iterdir()) == ["state.pt", "weights-net.safetensors"]
    torch.load(folder / "state.pt", weights_only=True)  # optimizer / generator states load without pickle


def _bin_unet_model(tiny_sd_dir, tmp_path) -> Path:
    "A copy of the tiny model whose UNet weights are a pickled `.bin` file."
    from diffusers import UNet2DConditionModel
    import shutil
    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_sd_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    return folder


def test_load_model_refuses_pickled_weights(tiny_sd_dir, tmp_path):
    with pytest.raises((ValueError, OSError, EnvironmentError)):
        load_model(str(_bin_unet_model(tiny_sd_dir, tmp_path)))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: each row is (call, error type, substrings the message must contain: the parameter and the value).
@pytest.fixture(scope="module")
def ctx(tiny_sd_dir, tmp_path_factory):
    "A loaded tiny model, a temporary folder with small CSV files, masks and a finished image folder."
    d = tmp_path_factory.mktemp("bad_inputs")
    model = load_model(str(tiny_sd_dir))
    (d / "no_seed_column.csv").write_text("prompt,seed\na cat,1\n")
    (d / "no_type_column.csv").write_text("prompt,evaluation_seed\na cat,1\n")
    (d / "bad_type.csv").write_text("type,artist,prompt,evaluation_seed\n2,x,a cat,1\n")
    (d / "nan_seed.csv").write_text("prompt,evaluation_seed\na cat,\n")
    (d / "used").mkdir()
    (d / "used" / "results.csv").write_text("x\n1\n")
    full = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.unet.named_parameters()}
    first = next(iter(full))
    renamed = {("nope" if n == first else n): m for n, m in full.items()}
    reshaped = {**full, first: torch.ones(3, dtype=torch.bool)}
    generate_images(model, ["a cat"], [1], d / "images", num_steps=2, progress=False)
    return SimpleNamespace(model=model, d=d, renamed=renamed, reshaped=reshaped)


_E = dict(config=AntLossConfig(num_steps=10, t_prime=8), iterations=1, cache_size=1, progress=False)
_M = dict(templates=["{} x"], progress=False)  # prompts short enough for the tiny tokenizer
_S = dict(num_steps=4, progress=False)


def row(id, call, error, *needles, marks=(), then=None):
    return pytest.param(call, error, needles, then, id=id, marks=marks)


BAD_INPUTS = [
    # models and devices
    row("load_model-unknown-source", lambda c: load_model("no such model"), FileNotFoundError, "source=", "'no such model'"),
    row("load_model-source-not-str", lambda c: load_model(3), TypeError, "source=3"),
    row("load_model-cuda-missing", lambda c: load_model("toy", device="cuda"), ValueError, "device='cuda'", marks=NO_CUDA),
    row("load_model-bad-dtype", lambda c: load_model("toy", dtype="float64"), ValueError, "dtype='float64'", "float16"),
    row("check_device-cuda-missing", lambda c: check_device("cuda"), ValueError, "device='cuda'", "'cpu'", marks=NO_CUDA),
    row("check_device-bad-name", lambda c: check_device("gpu"), ValueError, "device='gpu'"),
    # sampling
    row("sample-t'-above-T", lambda c: sample(c.model, ["a"], [1], t_prime=5, **_S), ValueError, "t_prime=5", "between 0 and 4"),
    row("sample-t'-negative", lambda c: sample(c.model, ["a"], [1], t_prime=-1, **_S), ValueError, "t_prime=-1"),
    row("sample-seeds-mismatch", lambda c: sample(c.model, ["a", "b"], [1], **_S), ValueError, "2 prompts but 1 seeds"),
    row("sample-empty-prompts", lambda c: sample(c.model, [], [], **_S), ValueError, "prompts=[]"),
    row("sample-prompts-a-string", lambda c: sample(c.model, "a cat", [1], **_S), TypeError, "prompts='a cat'"),
    row("sample-negative-seed", lambda c: sample(c.model, ["a"], [-1], **_S), ValueError, "seeds", "-1"),
    row("sample-negative-guidance", lambda c: sample(c.model, ["a"], [1], guidance_scale=-1.0, **_S), ValueError, "guidance_scale=-1.0"),
    row("sample-zero-steps", lambda c: sample(c.model, ["a"], [1], num_steps=0), ValueError, "num_steps=0"),
    row("generate_images-shard_size-0", lambda c: generate_images(c.model, ["a"], [1], c.d / "g0", shard_size=0), ValueError, "shard_size=0"),
    row("generate_images-other-prompts", lambda c: generate_images(c.model, ["a dog"], [1], c.d / "images", num_steps=2),
        ValueError, "folder=", "prompts_sha256"),
    row("load_images-not-an-image-folder", lambda c: load_images(c.d / "used"), FileNotFoundError, "folder=", "used"),
    # erase_concept and the ANT loss settings
    row("erase-unknown-method", lambda c: erase_concept(c.model, ["x"], method="foo", **_E), ValueError, "method='foo'", "'esd-x'"),
    row("erase-empty-concepts", lambda c: erase_concept(c.model, [], **_E), ValueError, "concept=[]"),
    row("erase-duplicate-concepts", lambda c: erase_concept(c.model, ["x", "x"], **_E), ValueError, "concept", "duplicates", "'x'"),
    row("erase-concept-a-string", lambda c: erase_concept(c.model, "nudity", **_E), TypeError, "concept='nudity'"),
    row("erase-unknown-preset", lambda c: erase_concept(c.model, ["x"], preset="celeb", **_E), ValueError, "preset='celeb'"),
    row("ant-t'-equals-T", lambda c: AntLossConfig(num_steps=10, t_prime=10), ValueError, "t_prime=10", "between 1 and 9"),
    row("ant-t'-zero", lambda c: AntLossConfig(num_steps=10, t_prime=0), ValueError, "t_prime=0"),
    row("ant-negative-lambda", lambda c: AntLossConfig(lambda1=-1.0), ValueError, "lambda1=-1.0"),
    row("erase-lr-zero", lambda c: erase_concept(c.model, ["x"], lr=0.0, **_E), ValueError, "lr=0.0"),
    row("erase-lr-negative", lambda c: erase_concept(c.model, ["x"], lr=-1e-3, **_E), ValueError, "lr=-0.001"),
    row("erase-zero-iterations", lambda c: erase_concept(c.model, ["x"], **{**_E, "iterations": 0}), ValueError, "iterations=0"),
    row("erase-negative-seed", lambda c: erase_concept(c.model, ["x"], seed=-1, **_E), ValueError, "seed=-1"),
    row("erase-negative-guidance", lambda c: erase_concept(c.model, ["x"], guidance_scale=-1.0, **_E), ValueError, "guidance_scale=-1.0"),
    row("erase-mask-wrong-names", lambda c: erase_concept(c.model, ["x"], mask=c.renamed, **_E), ValueError, "mask", "'nope'"),
    row("erase-mask-wrong-shapes", lambda c: erase_concept(c.model, ["x"], mask=c.reshaped, **_E), ValueError, "mask", "(3,)"),
    row("erase-mask-file-missing", lambda c: erase_concept(c.model, ["x"], mask=c.d / "none.safetensors", **_E),
        FileNotFoundError, "mask=", "none.safetensors"),
    row("erase-resume-without-folder", lambda c: erase_concept(c.model, ["x"], resume=True, **_E), ValueError, "resume=True", "checkpoint_dir"),
    row("erase-out_dir-used", lambda c: erase_concept(c.model, ["x"], out_dir=c.d / "used", **_E), FileExistsError, "out_dir=", "overwrite=True"),
    # erase_concepts, fusion and LoRA settings
    row("multi-unknown-method", lambda c: erase_concepts(c.model, ["ab"], method="foo", **_M), ValueError, "method='foo'", "'uce'"),
    row("multi-empty-concepts", lambda c: erase_concepts(c.model, [], **_M), ValueError, "concepts=[]"),
    row("multi-duplicate-concepts", lambda c: erase_concepts(c.model, ["ab", "ab"], **_M), ValueError, "concepts", "'ab'"),
    row("multi-erase-and-preserve", lambda c: erase_concepts(c.model, ["ab"], preserve=["ab"], **_M), ValueError, "preserve", "'ab'"),
    row("multi-lr-zero", lambda c: erase_concepts(c.model, ["ab"], lr=0.0, **_M), ValueError, "lr=0.0"),
    row("multi-zero-steps", lambda c: erase_concepts(c.model, ["ab"], steps=0, **_M), ValueError, "steps=0"),
    row("multi-unknown-templates", lambda c: erase_concepts(c.model, ["ab"], templates="poems", progress=False), ValueError, "templates='poems'"),
    row("multi-out_dir-used", lambda c: erase_concepts(c.model, ["ab"], out_dir=c.d / "used", **_M), FileExistsError,
        "out_dir", "overwrite=True"),
    row("multi-negative-seed", lambda c: erase_concepts(c.model, ["ab"], method="uce", seed=-1, out_dir=c.d / "uce", **_M),
        ValueError, "seed=-1"),
    row("fusion-negative-lambda", lambda c: FusionSettings(lamb=-1.0), ValueError, "lamb=-1.0"),
    row("lora-rank-zero", lambda c: LoraSettings(rank=0), ValueError, "rank=0"),
    row("lora-lr-negative", lambda c: train_concept_lora(c.model, "ab", ["a ab"], c.d / "l1", lr=-1.0, progress=False), ValueError, "lr=-1.0"),
    row("lora-empty-prompts", lambda c: train_concept_lora(c.model, "ab", [], c.d / "l2", progress=False), ValueError, "prompts=[]"),
    row("lora-settings-not-LoraSettings", lambda c: train_concept_lora(c.model, "ab", ["a ab"], c.d / "l3", settings=dict(rank=2),
        steps=2, cache_size=1, loss_config=_E["config"], progress=False), TypeError, "settings",),
    row("lora-float-steps-before-work", lambda c: train_concept_lora(c.model, "ab", ["a ab"], c.d / "l4", steps=2.5, cache_size=1,
        loss_config=_E["config"], latents_file=c.d / "l4.safetensors", progress=False), ValueError, "steps=2.5",
        then=lambda c: not (c.d / "l4.safetensors").exists(),),
    row("saliency-gamma-and-top_fraction", lambda c: threshold_map({"w": torch.ones(2)}, gamma=0.1, top_fraction=0.1),
        ValueError, "gamma=0.1", "top_fraction=0.1"),
    row("saliency-empty-prompts", lambda c: saliency_mask(c.model, [], [0], gamma=0.1), ValueError, "prompts=[]"),
    # prompt files
    row("i2p-missing-file", lambda c: load_i2p(c.d / "missing.csv"), FileNotFoundError, "missing.csv", "path"),
    row("coco-missing-column", lambda c: load_coco(c.d / "no_seed_column.csv"), ValueError, "no_seed_column.csv", "['evaluation_seed']"),
    row("celebrity-missing-column", lambda c: load_celebrity(c.d / "no_type_column.csv"), ValueError, "no_type_column.csv", "['type']"),
    row("artist-bad-type-values", lambda c: load_artist(c.d / "bad_type.csv"), ValueError, "'type'", "[2]"),
    row("coco-missing-seed-value", lambda c: load_coco(c.d / "nan_seed.csv"), ValueError, "evaluation_seed", "nan_seed.csv",),
    # run folders, checkpoints, training entry points
    row("run_dir-used-folder", lambda c: run_dir(c.d / "used"), FileExistsError, "out_dir=", "overwrite=True"),
    row("save_model-used-folder", lambda c: save_model(c.model, c.d / "used"), FileExistsError, "path=", "overwrite=True"),
    row("checkpointer-every-zero", lambda c: Checkpointer(c.d / "ck", every=0), ValueError, "every=0"),
    row("toy-lr-zero", lambda c: train_toy_model(c.d / "toy0", ToyTrainConfig(lr=0.0), progress=False), ValueError, "lr=0.0"),
    row("toy-warmup-zero", lambda c: train_toy_model(c.d / "toy1", ToyTrainConfig(steps=1, batch_size=1, warmup=0), progress=False),
        ValueError, "warmup=0"),
    row("toy-ckpt_every-zero", lambda c: train_toy_model(c.d / "toy2", ToyTrainConfig(steps=1, batch_size=1, ckpt_every=0), progress=False),
        ValueError, "ckpt_every=0"),
    row("toy-cuda-missing", lambda c: train_toy_model(c.d / "toy3", ToyTrainConfig(steps=1, batch_size=1), device="cuda", progress=False),
        ValueError, "device='cuda'", then=lambda c: not (c.d / "toy3").exists(),
        marks=NO_CUDA),
    row("toy-batch_size-float", lambda c: train_toy_model(c.d / "toy4", ToyTrainConfig(steps=1, batch_size=1.5), progress=False),
        ValueError, "batch_size=1.5"),
    row("toy-ema_decay-above-1", lambda c: train_toy_model(c.d / "toy5", ToyTrainConfig(steps=1, batch_size=1, ema_decay=2.0), progress=False),
        ValueError, "ema_decay=2.0"),
    row("toy-p_drop-above-1", lambda c: train_toy_model(c.d / "toy6", ToyTrainConfig(steps=1, batch_size=1, p_drop=1.5), progress=False),
        ValueError, "p_drop=1.5"),
    row("toy-prediction_type-unknown", lambda c: train_toy_model(c.d / "toy7", ToyTrainConfig(steps=1, batch_size=1,
        prediction_type="sample"), progress=False), ValueError, "prediction_type='sample'", "'v_prediction'"),
    row("toy-zero_terminal_snr-with-epsilon", lambda c: train_toy_model(c.d / "toy8", ToyTrainConfig(steps=1, batch_size=1,
        zero_terminal_snr=True), progress=False), ValueError, "zero_terminal_snr=True", "prediction_type='v_prediction'"),
    row("multi-generate_images-writes-before-checking", lambda c: multi_generate_images(c.model, ["a"], [1], c.d / "mg",
        guidance_scale=-1.0, num_steps=2, progress=False), ValueError, "guidance_scale=-1.0", then=lambda c: not (c.d / "mg").exists()),
]


@pytest.mark.parametrize("call, error, needles, then", BAD_INPUTS)
def test_bad_input_gets_a_clear_error(ctx, call, error, needles, then):
    with pytest.raises(error) as info:
        call(ctx)
    message = str(info.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"the message lacks {missing}: {message}"
    if then is not None: assert then(ctx), "the call left files behind although its input was refused"


def test_the_table_has_enough_rows():
    assert len([p for p in BAD_INPUTS if not p.marks]) >= 20
