"""The network: backbone + head (``network``), backbones registered by name with their weights
and preprocessing (``backbones``), and the one module that asks about GPUs (``accelerator``)."""
