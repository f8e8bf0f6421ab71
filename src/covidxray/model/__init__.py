"""The network: backbone + head (``network``), backbones registered by name with their weights
and preprocessing (``backbones``), every shipped weight by name (``weights``), the lung
segmenter (``lungs``), and the one module that asks about GPUs (``accelerator``); ``backend``
chooses Keras' backend before Keras is imported."""
