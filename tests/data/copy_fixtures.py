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
    # MaskGIT generators: the .npy arrays go into reference.npz like the others; their sampler
    # and MLM-loss replays are copied as they are (GENERATOR_EXTRAS).
    "generator_imagebert_tiny": True,
    "generator_uvit_tiny": True,
}
GENERATOR_EXTRAS = ("sampling.npz", "replays.json", "mlm_loss.npz")


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
        if name.startswith("generator_"):
            for extra in GENERATOR_EXTRAS:
                shutil.copy(os.path.join(src, name, extra), os.path.join(out, extra))
    copy_alit(src, dst)
    copy_train_steps(src, dst)
    copy_gan_losses(src, dst)


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


GAN_DISCRIMINATOR_GRADS = ("block_in.0.weight", "block_in.0.bias", "blocks.0.0.bias",
                           "blocks.0.2.weight", "blocks.0.2.bias", "blocks.2.2.weight",
                           "blocks.2.2.bias", "to_logits.0.bias", "to_logits.2.weight",
                           "to_logits.2.bias")


def copy_gan_losses(src: str, dst: str, name: str = "titok_gan_losses") -> None:
    """GAN losses: both weight files whole; from losses.npz the logits, lpips_per_image, the
    generator gradients subsampled [:, :, ::3, ::3] (86x86 per channel, both borders included)
    and the discriminator gradients of GAN_DISCRIMINATOR_GRADS (the input conv, two GroupNorms,
    the output convs; the big 3x3 convs are left out). ``inputs`` is ``inputs_b2``; the
    reconstructions are regenerated by the test (clip(inputs + float32(0.08) *
    default_rng(1234).standard_normal, 0, 1), float32), checked against the sha256 kept here."""
    import hashlib
    out = os.path.join(dst, name)
    os.makedirs(out, exist_ok=True)
    ref = np.load(os.path.join(src, name, "losses.npz"))
    arrays = {k: ref[k] for k in ("stage2/logits_real", "stage2/logits_fake",
                                  "single_stage_vq/lpips_per_image")}
    for setup in ("stage2", "single_stage_vq"):
        key = f"{setup}/generator_grad_wrt_reconstructions"
        arrays[key + "_sub3"] = np.ascontiguousarray(ref[key][:, :, ::3, ::3])
    for k in GAN_DISCRIMINATOR_GRADS:
        arrays[f"stage2/discriminator_grad/{k}"] = ref[f"stage2/discriminator_grad/{k}"]
    np.savez_compressed(os.path.join(out, "reference.npz"), **arrays)
    with open(os.path.join(src, name, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["reconstructions_sha256"] = hashlib.sha256(
        np.ascontiguousarray(ref["reconstructions"], np.float32).tobytes()).hexdigest()
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    for weights in ("discriminator.safetensors", "convnext_tiny.safetensors"):
        shutil.copy(os.path.join(src, name, weights), os.path.join(out, weights))


if __name__ == "__main__":
    main(sys.argv[1])
