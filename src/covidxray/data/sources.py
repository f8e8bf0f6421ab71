"""Which sources training uses: those asked for, less those that would teach a model which
source it sees rather than the disease (``confounded_sources``)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from covidxray.data.dataset import DataError, Record

CONFOUNDING_GAP = 0.3  # a source whose positive share differs this much from the whole set's


def confounded_sources(records: list[Record], by_share: bool = True) -> dict[str, str]:
    """Sources that would teach a model which source it sees rather than the disease, each with
    the reason: a single class, or (``by_share``) a positive share CONFOUNDING_GAP or more away
    from the whole data set's. Records without a source are not judged.

    ``by_share=False`` is the criterion for a model of three or more classes: only a
    single-label source is left out. Such a model learns COVID against the other classes
    within each source, and the collections that bring other pneumonias bring COVID beside
    them in their own proportions (ieee8023: four COVID films to one pneumonia): leaving them
    out for their share would leave no pneumonia to learn from."""
    by_source = defaultdict(list)
    for r in records:
        if r.source:
            by_source[r.source].append(r.target if by_share else r.label.lower())
    found = {}
    if not by_share:
        for source, labels in sorted(by_source.items()):
            if len(set(labels)) == 1:
                found[source] = f"one class only ({len(labels)} {labels[0]} images)"
        return found
    overall = float(np.mean([t for targets in by_source.values() for t in targets] or [0]))
    for source, targets in sorted(by_source.items()):
        share = float(np.mean(targets))
        if share in (0.0, 1.0):
            found[source] = (f"one class only ({len(targets)} "
                             f"{'positive' if share else 'negative'} images)")
        elif abs(share - overall) >= CONFOUNDING_GAP:
            found[source] = f"{share:.0%} positive against {overall:.0%} in the whole data set"
    return found


def select_sources(records: list[Record], include=None, exclude=(),
                   exclude_confounded: bool = False,
                   by_share: bool = True) -> tuple[list[Record], dict[str, str]]:
    """The records of the sources chosen for training, and each source left out with why.

    ``include``: only these sources (None: all); ``exclude``: not these; ``exclude_confounded``:
    not those ``confounded_sources`` names (``by_share``: its criterion), judged on the whole
    data set (nothing to judge when no record names its source).
    """
    if include is None and not exclude and (not exclude_confounded
                                            or not any(r.source for r in records)):
        return records, {}
    unsourced = [r.path for r in records if not r.source]
    if unsourced:
        raise DataError(f"{len(unsourced)} images have no source (e.g. {unsourced[0]}): choosing "
                        f"sources needs a source column or --source-from-prefix")
    known = sorted({r.source for r in records})
    unknown = sorted((set(include or ()) | set(exclude)) - set(known))
    if unknown:
        raise DataError(f"unknown source(s) {', '.join(unknown)}; the data has {', '.join(known)}")
    left_out = {}
    for source in known:
        if include is not None and source not in include:
            left_out[source] = "not among the sources chosen (--sources)"
        elif source in exclude:
            left_out[source] = "left out by --exclude-sources"
    if exclude_confounded:
        for source, reason in confounded_sources(records, by_share).items():
            left_out.setdefault(source, f"confounded: {reason}")
    kept = [r for r in records if r.source not in left_out]
    if len({r.target for r in kept}) < 2:
        remaining = ", ".join(sorted({r.source for r in kept})) or "none"
        raise DataError(f"the sources left for training ({remaining}) do not hold both classes;"
                        f" left out: " + "; ".join(f"{s} ({why})" for s, why in left_out.items()))
    return kept, left_out
