"""Train and predict speed of each backbone against its validation AUC, on one fixed split.

    python bench/backbones.py DATA --out DIR [--size 64] [--epochs 3] [--backbones a,b,...]

Every backbone trains from random weights (``--weights none``; no ImageNet weights offline)
with the default from-scratch recipe on the same ``split.csv`` (made once, by the first run),
then predicts the test split from files. Training speed is training images x epochs run over
the wall time of ``covidxray.train`` (so it includes validation and the gate fit); predict
speed is ``Predictor.predict_paths`` over the test files. One table, the first backbone
(ResNet50, the reference design) as the baseline of each ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# the reference first (the baseline of each ratio), the big ResNets last
DEFAULT = ("resnet50", "mobilenetv3small", "mobilenetv3large", "efficientnetb0", "densenet121",
           "resnet101", "resnet152")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--out", required=True, help="folder for one run per backbone")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbones", default=",".join(DEFAULT))
    parser.add_argument("--source-from-prefix", action="store_true")
    args = parser.parse_args(argv)

    import covidxray
    from covidxray.metrics import roc_auc
    from covidxray.run.folder import RunFolder
    from covidxray.run.predictor import Predictor

    out = Path(args.out)
    split_file = None
    rows = []
    for backbone in args.backbones.split(","):
        run = out / backbone
        timing = run / "train_seconds.txt"  # a finished run is reused with its own timing
        if not timing.is_file():
            start = time.perf_counter()
            covidxray.train(args.data, run, image_size=args.size, backbone=backbone,
                            weights="none", finetune_epochs=args.epochs, patience=args.epochs,
                            # the recipe the table in docs/benchmarks.md was measured with
                            intensity="none", crop=0.0, source_augment=False,
                            test_time_views=0,
                            split_file=split_file, source_from_prefix=args.source_from_prefix,
                            verbose=0)
            timing.write_text(f"{time.perf_counter() - start:.1f}\n")
        train_seconds = float(timing.read_text())
        split_file = split_file or str(RunFolder(run).split_file)
        predictor = Predictor.load(run, runtime="keras")
        metadata = predictor.metadata
        n_train = metadata.split_counts["train"]
        test = [r for r in RunFolder(run).read_split(predictor.positive_class)
                if r.split == "test"]
        start = time.perf_counter()
        predictions = predictor.predict_paths([r.path for r in test])
        predict_seconds = time.perf_counter() - start
        test_auc = roc_auc(np.array([r.target for r in test]),
                           np.array([p.probability for p in predictions]))
        rows.append(dict(backbone=backbone,
                         parameters=predictor.model.count_params(),
                         train_img_s=sum(n_train.values()) * args.epochs / train_seconds,
                         predict_img_s=len(test) / predict_seconds,
                         val_auc=metadata.validation_metrics["roc_auc"], test_auc=test_auc))
        print(json.dumps(rows[-1]), flush=True)

    base = rows[0]
    print(f"\n{args.size} px, {args.epochs} epochs from random weights, same split\n")
    print("| backbone | parameters | train img/s | vs " + base["backbone"] + " | predict img/s"
          " | vs " + base["backbone"] + " | validation AUC | test AUC |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['parameters'] / 1e6:.1f} M | {r['train_img_s']:.1f} | "
              f"{r['train_img_s'] / base['train_img_s']:.2f}x | {r['predict_img_s']:.1f} | "
              f"{r['predict_img_s'] / base['predict_img_s']:.2f}x | {r['val_auc']:.3f} | "
              f"{r['test_auc']:.3f} |")


if __name__ == "__main__":
    main()
