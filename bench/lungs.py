"""What the lung segmenter costs and what it finds: milliseconds per image on this machine,
and the outline drawn on films it never trained on, for looking at.

    python bench/lungs.py ../shared/data/cxr-dev --sheet outlines.png --n 10

Times ``LungSegmenter.field`` (prepare, the network, the post-processing) one image at a time,
as the ``Predictor`` calls it, after a warm-up; the sheet shows ``--n`` normal films of each of
raddb and darkcov with the outline drawn on (cxr-dev's normals are not in lung-masks).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from covidxray.model.lungs import LungSegmenter
from covidxray.pixels.decode import read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="cxr-dev (its NORMAL folder is used)")
    parser.add_argument("--n", type=int, default=10, help="films per source on the sheet")
    parser.add_argument("--sheet", help="a PNG contact sheet of the outlines")
    parser.add_argument("--model", help="a segmenter folder (default: the shipped one)")
    args = parser.parse_args()
    segmenter = LungSegmenter.load(args.model)
    normals = sorted(Path(args.data, "NORMAL").glob("*.png"))
    by_source = {source: [p for p in normals if p.name.startswith(source + "_")][:args.n]
                 for source in ("raddb", "darkcov")}
    films = [read_image(p) for paths in by_source.values() for p in paths]
    segmenter.field(films[0])
    times = []
    for film in films * 3:
        started = time.perf_counter()
        segmenter.field(film)
        times.append(time.perf_counter() - started)
    print(f"{segmenter.card.name}: {1000 * statistics.median(times):.1f} ms median, "
          f"{1000 * sorted(times)[int(0.95 * len(times)) - 1]:.1f} ms p95 per image "
          f"({len(times)} calls, one image each)")
    fields = [segmenter.field(f) for f in films]
    print(f"plausible lungs on {sum(f.plausible for f in fields)} of {len(fields)} normal films; "
          f"lung area {np.mean([f.area for f in fields]):.0%} of the image on average")
    for (source, paths), start in zip(by_source.items(), (0, len(by_source["raddb"]))):
        for path, field in zip(paths, fields[start:start + len(paths)]):
            if not field.plausible:
                print(f"  {source}: {path.name}: {field.reason}")
    if args.sheet:
        tiles = []
        for film, field in zip(films, fields):
            rgb = np.repeat(np.asarray(Image.fromarray(np.rint(film * 255).astype(np.uint8))
                                       .resize((256, 256)))[..., None], 3, axis=2)
            rgb[field.outline((256, 256))] = (255, 64, 0) if field.plausible else (0, 128, 255)
            tiles.append(rgb)
        rows = [np.concatenate(tiles[i:i + args.n], axis=1)
                for i in range(0, len(tiles), args.n)]
        Image.fromarray(np.concatenate(rows)).save(args.sheet)
        print(f"outlines: {args.sheet} (top: raddb normals, bottom: darkcov normals)")


if __name__ == "__main__":
    main()
