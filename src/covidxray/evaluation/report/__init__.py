"""One self-contained HTML report of a run: data and audit, training, metrics with CIs, curves,
calibration, per-source results, a Grad-CAM gallery, the shortcut check and a model card.

Images are embedded as data URIs, so the file opens anywhere without the tool or a network.
``page`` builds the page and its sections, ``plots`` the figures, ``card`` the model card and
``audit`` runs the data audit on the run's films.
"""

from covidxray.evaluation.report.audit import audit_split
from covidxray.evaluation.report.card import claim_items, model_description
from covidxray.evaluation.report.page import build_report, gallery_cases

__all__ = ["audit_split", "build_report", "claim_items", "gallery_cases", "model_description"]
