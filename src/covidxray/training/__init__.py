"""Training: the two phases (``fit``, ``phases``), cached backbone outputs (``features``),
streamed batches (``pipeline``), calibration and the gate (``finalize``), ensembles
(``ensemble``), the lung segmenter (``lungs``), data parallel (``distribute``) and experiment
tracking (``tracking``)."""
