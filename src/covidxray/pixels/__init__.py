"""Pixels: any image file -> one float32 gray array (``decode``), the one preparation of it for
the model (``preprocess``), what is done to it (``transforms``: intensity, crop, the lungs grown
or filled, source-cue augmentation), and the lung field's geometry and the one heat share
(``lungfield``)."""
