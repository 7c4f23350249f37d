"""The GAN phase of TiTok training (official stage-2 and single-stage recipes): the patch
discriminator, the perceptual losses (LPIPS-VGG16, ConvNeXt-S logits) and the loss functions."""
