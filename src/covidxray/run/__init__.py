"""The run folder: what training leaves for everything downstream, and the ``Predictor`` that
is the one path from an input to a prediction; ``ood``, its out-of-distribution gate."""
