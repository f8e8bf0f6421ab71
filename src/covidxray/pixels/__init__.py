"""Pixels: any image file -> one float32 gray array (``imageio``), and what is done to it
(``transforms``: intensity, crop, source-cue augmentation)."""
