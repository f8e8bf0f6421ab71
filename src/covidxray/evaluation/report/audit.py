"""The data audit a report runs on the films of its run (``covidxray.data.audit``)."""

from __future__ import annotations

from pathlib import Path

from covidxray.run.folder import RunFolder


def audit_split(run_dir: Path, positive_class: str) -> dict:
    """The audit of a run's ``split.csv``, written beside it as ``audit.json``."""
    from covidxray.data.audit import audit
    from covidxray.fileutil import write_json_atomic
    # the image statistics of the training data were measured by training (RunMetadata)
    folder = RunFolder(run_dir)
    result = audit(folder.read_split(positive_class),
                   separability=False).to_dict()
    write_json_atomic(folder.audit_file, result)
    return result
