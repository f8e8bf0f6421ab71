"""Speed of the frozen phase, the input pipeline and inference, each beside its baseline.

    python bench/speed.py [--data DIR] [--n 256] [--size 64] [--backbone resnet50]

Every figure is measured in this run, on this machine, next to the baseline it is judged
against, and printed as one table with the ratio and the target of issue 5:

- frozen phase: 20 head epochs on cached features (one forward pass to fill the cache, then the
  head alone) against one forward pass over the same training images (target <= 1.3x); a
  seed-style epoch (the frozen backbone run again inside ``fit``) for comparison;
- input pipeline: a training epoch read from the files by ``ImageSequence`` (2 worker
  threads, decoding every epoch, or from a filled decoded-image cache) against ``fit`` on the
  same images held in memory, in alternating pairs, the median pair's ratio reported (target
  >= 0.9x the in-memory throughput);
- inference: ``Predictor.predict_paths`` on a folder against the raw forward throughput of the
  model on in-memory tensors (target >= 0.9x), and the latency of ``Predictor.predict(path)``
  for one image against one forward pass of one image (target <= 1.2x); the model load time.

Images come from ``--data`` (a class folder such as cxr-dev) or, without it, are drawn
synthetic radiographs written as PNG files. Weights are random (``none``): speed does not
depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(function, repeats: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sample_files(data: str | None, n: int, folder: Path) -> tuple[list[str], np.ndarray]:
    """``n`` image files with their targets, drawn at random from ``data`` or from synthetic
    radiographs written here."""
    from covidxray.data.dataset import discover
    if not data:
        from covidxray.data.synthetic import make_synthetic_dataset
        data = make_synthetic_dataset(folder / "synthetic", n_per_class=(n + 1) // 2, size=256,
                                      seed=0)
    records = discover(data).records
    chosen = [records[i] for i in np.random.default_rng(0).permutation(len(records))[:n]]
    return [r.path for r in chosen], np.array([r.target for r in chosen], np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a class-folder dataset (default: drawn radiographs)")
    parser.add_argument("--n", type=int, default=256, help="training images")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--head-epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="epoch pairs per pipeline ratio")
    args = parser.parse_args(argv)

    import keras

    import covidxray  # first: it picks the Keras backend (torch unless KERAS_BACKEND says)
    from covidxray.model.network import build_model, forward, unfreeze_top_stages
    from covidxray.pixels.preprocess import load_for_model
    from covidxray.run.predictor import Predictor
    from covidxray.training.features import FeatureCache, head_model
    from covidxray.training.pipeline import ImageSequence

    rows = []

    def row(what, value, unit, baseline, baseline_value, ratio, target):
        rows.append((what, f"{value:.3g} {unit}", baseline, f"{baseline_value:.3g} {unit}",
                     f"{ratio:.2f}x", target))
        print(f"  {what}: {value:.3g} {unit} (baseline {baseline_value:.3g}) {ratio:.2f}x",
              flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="covidxray-bench-"))
    paths, targets = sample_files(args.data, args.n, scratch)
    n, size, batch = len(paths), args.size, args.batch_size
    images = np.stack([load_for_model(p, size) for p in paths])
    print(f"{n} images at {size} px, {args.backbone}, batch {batch}, backend "
          f"{keras.backend.backend()}", flush=True)

    # frozen phase -------------------------------------------------------------------------
    model = build_model(size, args.backbone, "none", augment=None)
    forward(model, images[:batch])  # warm-up: the first call builds the graph
    one_pass = timed(lambda: forward(model, images, batch), 2)

    def cached_head():
        cache = FeatureCache()
        features = cache.features(model, images, batch_size=batch)
        head = head_model(model)
        head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        head.fit(features, targets, epochs=args.head_epochs, batch_size=batch, verbose=0)

    head_phase = timed(cached_head)
    row(f"{args.head_epochs} head epochs on cached features (cache filled first)", head_phase,
        "s", "one forward pass", one_pass, head_phase / one_pass, "<= 1.3x")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    seed_epoch = timed(lambda: model.fit(images[..., None], targets, batch_size=batch,
                                         epochs=1, verbose=0))
    row("one seed-style frozen epoch (backbone run in fit)", seed_epoch, "s",
        "one forward pass", one_pass, seed_epoch / one_pass,
        f"{args.head_epochs} of them: {args.head_epochs * seed_epoch / one_pass:.1f}x")

    # input pipeline -----------------------------------------------------------------------
    unfreeze_top_stages(model, args.backbone, "all", freeze_batchnorm=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    model.fit(images[:batch, ..., None], targets[:batch], batch_size=batch, epochs=1,
              verbose=0)  # warm-up of the trainable graph
    fit_memory = lambda: model.fit(images[..., None], targets, batch_size=batch, epochs=1,
                                   shuffle=True, verbose=0)
    cache_dir = scratch / "decoded"
    for label, cache in (("no decoded cache", None), ("decoded-image cache", cache_dir)):
        sequence = ImageSequence(paths, targets, size, batch, shuffle=True, cache_dir=cache,
                                 workers=2)
        if cache is not None:
            model.fit(sequence, epochs=1, verbose=0)  # fills the cache: later epochs read it
        # pairs of epochs, in memory then from files, so a drift of the machine's speed hits
        # both sides of each ratio; the median pair is reported
        pairs = [(n / timed(fit_memory), n / timed(lambda: model.fit(sequence, epochs=1,
                                                                       verbose=0)))
                 for _ in range(args.repeats)]
        in_memory, streamed = sorted(pairs, key=lambda p: p[1] / p[0])[len(pairs) // 2]
        row(f"train epoch from files, 2 worker threads ({label})", streamed, "img/s",
            "fit on in-memory tensors", in_memory, streamed / in_memory, ">= 0.9x")

    # inference ----------------------------------------------------------------------------
    manifest = scratch / "manifest.csv"  # the sample as a CSV dataset, for a real run
    manifest.write_text("file,label\n" + "".join(
        f"{Path(p).resolve()},{'COVID' if t else 'NORMAL'}\n" for p, t in zip(paths, targets)))
    # the images alone (no test-time views, which multiply every forward pass by K + 1), so
    # that the figures measure what the predict path adds to one forward pass
    run = covidxray.train(manifest, scratch / "run", image_size=size, backbone=args.backbone,
                          weights="none", head_epochs=1, finetune_epochs=0, batch_size=batch,
                          split_fractions=(0.6, 0.4, 0.0), intensity="none", crop=0.0,
                          test_time_views=0, verbose=0)
    load_seconds = timed(lambda: Predictor.load(run, runtime="keras"))
    predictor = Predictor.load(run, runtime="keras")
    raw_model = predictor.model
    raw_model.predict(images[:batch, ..., None], batch_size=batch, verbose=0)
    raw = n / timed(lambda: raw_model.predict(images[..., None], batch_size=batch, verbose=0), 2)
    predictor.predict_paths(paths[:batch])
    folder = n / timed(lambda: predictor.predict_paths(paths, batch), 2)
    row("predict a folder (decode, gate, heat map)", folder, "img/s",
        "raw forward, in-memory tensors", raw, folder / raw, ">= 0.9x")
    one = images[:1, ..., None]
    raw_model(one, training=False)
    single_forward = timed(lambda: raw_model(one, training=False), 20)
    single = timed(lambda: predictor.predict(paths[0]), 20)
    row("latency of predict(path), one image", single * 1000, "ms",
        "one forward pass of one image", single_forward * 1000, single / single_forward,
        "<= 1.2x")
    print(f"  model load: {load_seconds:.2f} s", flush=True)

    print(f"\n{n} images at {size} px, {args.backbone}, batch {batch}, backend "
          f"{keras.backend.backend()}; model load {load_seconds:.2f} s\n")
    header = ("measurement", "value", "baseline (same run)", "baseline value", "ratio", "target")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
