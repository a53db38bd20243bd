"""The backbone's image processor: the PIL one, loaded without transformers' torchvision
fallback warning, giving the pixels that fallback gave.

Run in a fresh interpreter: transformers logs its warning once per process, so a test in
this process would pass for any loader once another test had triggered it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = r"""
import sys
from pathlib import Path

import numpy as np
import PIL.Image

from rcsr_flower.backbones.clip import load_backbone
from rcsr_flower.embedded.random_clip import save_random_clip, tiny_clip_config

out = Path(sys.argv[1])
save_random_clip(out / "model", tiny_clip_config())
rng = np.random.default_rng(0)
images = [  # odd sizes: resize of the short side and the centre crop both matter
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for h, w in ((97, 131), (64, 64), (150, 71))
]
backbone = load_backbone(str(out / "model"), device="cpu")
np.save(out / "ours.npy", backbone.preprocess(images).numpy())
print("LOADED", type(backbone.image_processor).__name__, file=sys.stderr, flush=True)

# what the loader gave before: the class transformers falls back to for the old name
import transformers

fallback = transformers.CLIPImageProcessor.from_pretrained(str(out / "model"))
pixels = fallback(images=images, return_tensors="pt")["pixel_values"]
np.save(out / "fallback.npy", pixels.numpy())
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = tmp_path_factory.mktemp("processor")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_loading_a_backbone_logs_no_torchvision_fallback(loaded):
    _, stderr = loaded
    before, marker, after = stderr.partition("LOADED ")
    assert marker, stderr[-3000:]
    assert after.startswith("CLIPImageProcessorPil")
    assert "torchvision" not in before, before[-3000:]
    # the check can fail: asking for the old name logs it, in this very process
    assert "requires torchvision (not installed); falling back" in after


def test_pixels_are_those_of_the_fallback_processor(loaded):
    out, _ = loaded
    ours, fallback = np.load(out / "ours.npy"), np.load(out / "fallback.npy")
    assert ours.shape == (3, 3, 64, 64) and ours.dtype == np.float32
    assert np.array_equal(ours, fallback)
