"""Evaluation: rFID/IS with a Flax FID InceptionV3, PSNR/SSIM/LPIPS, codebook usage and linear
probing, as plug-ins run over a sharded eval split (:mod:`titok_jax.evals.runner`)."""
