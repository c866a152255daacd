"""Shared pytest fixtures: a tiny SD-format pipeline on disk and loaded, and the shared prompt files."""
from pathlib import Path

import pytest
import torch

from ant_nb.core import load_model
from ant_nb.testing import build_tiny_sd

torch.set_num_threads(1)  # tests run in parallel workers on few cores

SHARED_DATA = Path(__file__).resolve().parents[1].parent/"shared"/"data"

# Batched and per-prompt UNet calls sum in different orders (batch composition and thread count change float32
# summation), so their results differ by rounding. Measured on the tiny SD model (latents up to ~20 in magnitude) over
# 24 sampling runs (4 seed pairs x 3 t' x 1 and 2 threads): at most 5.5e-5 (tests/bench/float32_noise.py).
BATCH_ATOL = 2e-4


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    "Folder of a tiny randomly-initialised SD-format pipeline (diffusers layout), built once per session."
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd")/"tiny-sd")


@pytest.fixture
def tiny_sd(tiny_sd_dir):
    "A fresh `DiffusionModel` loaded from `tiny_sd_dir` on CPU (float32); safe to modify in a test."
    return load_model(str(tiny_sd_dir))


@pytest.fixture
def shared_data() -> Path:
    "The shared folder of real prompt files (`../shared/data` beside the checkout); skips the test if absent."
    if not SHARED_DATA.is_dir(): pytest.skip(f"real prompt files not found at {SHARED_DATA}")
    return SHARED_DATA
