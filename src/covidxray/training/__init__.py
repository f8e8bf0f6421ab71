"""Training: the two phases (``fit``), cached backbone outputs (``features``) and streamed
batches (``pipeline``)."""
