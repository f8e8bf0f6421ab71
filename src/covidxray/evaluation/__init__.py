"""Judging a run: pure metrics, evaluation per source, Grad-CAM and the shortcut check,
leave-one-source-out, the thumbnail baseline, and the HTML report."""
