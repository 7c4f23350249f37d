"""Copies the parity fixtures the tests need from the shared fixture set into tests/data.

The fixtures were made by running the official PyTorch code (see the shared fixtures README):
tiny official architectures with random weights, a fixed input batch and every intermediate.
To keep the repository small, each fixture's arrays go into one compressed ``.npz`` (official
NCHW / [B, C, 1, N] layouts, unchanged) and duplicated weights are stored once:
``titok_stage1_tiny`` weights == ``titok_legacy_vq_tiny`` weights minus ``pixel_*``, and those
``pixel_*`` keys are copies of the tiny VQGAN's ``decoder.*`` / ``quantize.*``.

    python tests/data/copy_fixtures.py /path/to/shared/fixtures
"""
import json
import os
import shutil
import sys

import numpy as np

FIXTURES = {
    "maskgit_vqgan_tiny": True,
    "titok_legacy_vq_tiny": False,   # weights rebuilt from stage1 + VQGAN weights
    "titok_stage1_tiny": True,
    "titok_vq_pixel_tiny": True,
    "titok_vae_tiny": True,
}


def main(src: str) -> None:
    dst = os.path.dirname(os.path.abspath(__file__))
    # Every input value is exactly k/255: store the uint8 k (tests divide by 255 in float32).
    inputs = np.load(os.path.join(src, "inputs_b2.npy"))
    np.save(os.path.join(dst, "inputs_b2_uint8.npy"), np.round(inputs * 255).astype(np.uint8))
    for name, keep_weights in FIXTURES.items():
        out = os.path.join(dst, name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(src, name, "manifest.json")) as f:
            manifest = json.load(f)
        arrays = {k: np.load(os.path.join(src, name, f"{k}.npy"))
                  for k, v in manifest["tensors"].items() if v["stored"]}
        np.savez_compressed(os.path.join(out, "reference.npz"), **arrays)
        slim = {k: manifest[k] for k in ("fixture", "build", "tensors", "stage1_loss")
                if k in manifest}
        slim["state_dict"] = manifest["state_dict"]
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(slim, f, indent=1)
        if keep_weights:
            shutil.copy(os.path.join(src, name, "weights.safetensors"),
                        os.path.join(out, "weights.safetensors"))
    copy_alit(src, dst)
    copy_train_steps(src, dst)


def copy_train_steps(src: str, dst: str, name: str = "titok_stage1_tiny") -> None:
    """Three official stage-1 training steps (per-step lr/loss/grad norm in the json; params and
    EMA after step 3 in the npz)."""
    arrays = dict(np.load(os.path.join(src, name, "train_steps.npz")))
    np.savez_compressed(os.path.join(dst, name, "train_steps.npz"), **arrays)
    shutil.copy(os.path.join(src, name, "train_steps.json"),
                os.path.join(dst, name, "train_steps.json"))


def copy_alit(src: str, dst: str, name: str = "alit_tiny_fixture") -> None:
    """ALIT: both scenario files recompressed, the weights, and the manifest's metadata."""
    out = os.path.join(dst, name)
    os.makedirs(out, exist_ok=True)
    for scenario in ("ref_forced_mask", "ref_eval"):
        arrays = dict(np.load(os.path.join(src, name, f"{scenario}.npz")))
        np.savez_compressed(os.path.join(out, f"{scenario}.npz"), **arrays)
    with open(os.path.join(src, name, "manifest.json")) as f:
        manifest = json.load(f)
    keep = ("fixture", "build", "npz", "eval_metrics", "forced_mask_metrics", "train_stage1_loss",
            "encode_min_length", "state_dict", "num_params_total", "num_params_excl_vqgan")
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({k: manifest[k] for k in keep}, f, indent=1)
    shutil.copy(os.path.join(src, name, "weights.safetensors"),
                os.path.join(out, "weights.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
