#!/bin/bash
# Issue 26's cases by hand, as the closing note quotes them: a tiny run is trained first, then
# each case prints what a user sees. Needs root for the 40 MB tmpfs (the full-disk case).
#
#   bash bench/hardening_checks.sh [WORK_DIR]
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$repo/.venv/bin:$PATH REPO=$repo
work=${1:-$(mktemp -d)}
mkdir -p "$work" && cd "$work" || exit 1  # everything below is written, and removed, here
echo "in $work"
rm -rf tiny run* small-disk cut* keys* *.csv frames.dcm
python - <<'PY'
from covidxray.data.synthetic import make_synthetic_dataset
make_synthetic_dataset("tiny", n_per_class=14, size=96, seed=1)
PY
TRAIN="--image-size 64 --backbone mobilenetv3small --weights none --head-epochs 1 --finetune-epochs 1 --batch-size 8 --quiet"
echo "== 1. multi-frame bomb through the CLI"
python - <<'PY'
import sys, numpy as np
sys.path.insert(0, __import__("os").environ["REPO"] + "/tests")
from test_decode import write_dicom
write_dicom(__import__("pathlib").Path("frames.dcm"), np.zeros((1000, 1000), np.uint8), bits=8,
            deflated=True, pixel_data=bytes(300 * 1000 * 1000), NumberOfFrames=300)
PY
ls -la frames.dcm | awk '{print $5 " bytes"}'
covidxray train tiny --out run0 $TRAIN > /dev/null 2>&1
covidxray predict run0 frames.dcm; echo "exit $?"
echo "== 2. a full disk (a 40 MB tmpfs)"
mkdir -p small-disk && mount -t tmpfs -o size=40m tmpfs small-disk && echo mounted
dd if=/dev/zero of=small-disk/filler bs=1M count=39 status=none
covidxray train tiny --out small-disk/run $TRAIN; echo "exit $?"
ls -la small-disk/run small-disk/run/.checkpoints 2>&1 | head -20
rm small-disk/filler
covidxray train --resume --out small-disk/run --quiet; echo "exit $?"; ls small-disk/run
umount small-disk
echo "== 3. tracking server down"
time covidxray train tiny --out run-track --track mlflow=http://127.0.0.1:9 $TRAIN; echo "exit $?"
echo "== 4. two trainings on one folder"
covidxray train tiny --out run-two $TRAIN --finetune-epochs 3 & first=$!
sleep 8
covidxray train tiny --out run-two $TRAIN; echo "second exit $?"
wait $first; echo "first exit $?"; cat run-two/history.csv
echo "== 5. a manifest with duplicates, a conflict, an empty and a mis-cased label"
python - <<'PY'
import csv
rows = list(csv.DictReader(open("tiny/manifest.csv")))
out = ["file,label"]
for r in rows:
    out.append(f"tiny/{r['file']},{r['label']}")
out += [f"tiny/{rows[0]['file']},{rows[0]['label']}", f"tiny/{rows[1]['file']},NON-COVID",
        f"tiny/{rows[2]['file']},", f"tiny/{rows[3]['file']},covid "]
open("messy.csv", "w").write("\n".join(out) + "\n")
PY
covidxray evaluate run0 messy.csv --bootstrap 20 --shortcut-images 0 2>&1 | grep -E "WARNING|images:"
covidxray evaluate run0 messy.csv --strict --bootstrap 20 2>&1 | tail -1; echo "exit $?"
echo "== 6. archive: a cut last row ending in a newline; one folder named twice"
covidxray predict run0 tiny --out cut.csv --quiet
python - <<'PY'
text = open("cut.csv").read(); last = text.rstrip("\n").rfind("\n")
open("cut.csv", "w").write(text[:last + 25] + "\n")
PY
covidxray predict run0 tiny "$(pwd)/tiny" --out cut.csv
python -c "import csv; rows = list(csv.DictReader(open('cut.csv'))); print(len(rows), 'rows,', len({r['path'] for r in rows}), 'distinct paths')"
echo "== 8. API keys: 50 wrong keys"
covidxray apikey keys.txt --id pilot > /dev/null
python - <<'PY'
from fastapi.testclient import TestClient
from covidxray.config import ServeConfig
from covidxray.deploy.serve.app import create_app
client = TestClient(create_app("run0", settings=ServeConfig(
    allowed_hosts=("testserver",), api_keys="keys.txt", audit_db="sqlite:///keys.sqlite")))
codes = [client.get("/api/model", headers={"x-api-key": f"guess{i}"}).status_code for i in range(50)]
print({c: codes.count(c) for c in set(codes)}, "first 429 at attempt", codes.index(429) + 1)
PY
