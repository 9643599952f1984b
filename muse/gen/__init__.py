"""Generation on MUSE latents: latent extraction, a SANA flow-matching generator, sampling, training, gFID."""
