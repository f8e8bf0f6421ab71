#!/bin/bash
# Issue 34's table by hand, as the closing note quotes it: what a user sees for each hostile or
# unlucky case. A tiny run is trained first (seconds); the DICOM cases need Orthanc and DCMTK
# (make system-packages), the flagged-film case ../shared/data/not-frontal where present.
#
#   bash bench/hardening34.sh [WORK_DIR]
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$repo/.venv/bin:$PATH REPO=$repo COVIDXRAY_CACHE=${COVIDXRAY_CACHE:-}
work=${1:-$(mktemp -d)}
mkdir -p "$work" && cd "$work" || exit 1  # everything below is written, and removed, here
chmod 755 "$work"
echo "in $work"
rm -rf tiny run0 run1 export* out* arch* ro* node* orthanc* *.csv *.log
python - <<'PY'
from covidxray.data.synthetic import make_synthetic_dataset
make_synthetic_dataset("tiny", n_per_class=14, size=96, seed=1)
PY
TRAIN="--image-size 64 --backbone mobilenetv3small --weights none --head-epochs 1 --finetune-epochs 1 --batch-size 8 --quiet"
covidxray train tiny --out run0 $TRAIN > /dev/null 2>&1
covidxray train tiny --out run1 $TRAIN --seed 1 > /dev/null 2>&1
film=$(ls tiny/COVID/*.png | head -1)
# a folder nobody can write into, root included (permission bits do not stop root): a
# read-only tmpfs where this runs as root, else a folder without write permission
read_only() { mkdir -p "$1"; if [ "$(id -u)" = 0 ]; then mount -t tmpfs -o ro,size=1m tmpfs "$1"; else chmod 555 "$1"; fi; }
trap 'umount "$work/ro-out" "$work/ro" 2>/dev/null' EXIT
port() { python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }

echo "== 1. DICOM node: a StudyInstanceUID that is a path"
python - <<'PY'
import numpy as np, sys, os
sys.path.insert(0, os.environ["REPO"] + "/tests")
from test_decode import write_dicom
from covidxray.data.synthetic import synthetic_radiograph
film = np.rint(synthetic_radiograph(np.random.default_rng(0), 256) * 4095).astype(np.uint16)
write_dicom(__import__("pathlib").Path("film.dcm"), film, StudyInstanceUID="1.2.3.4",
            SeriesInstanceUID="1.2.3.5", BodyPartExamined="CHEST")
PY
node_port=$(port)
covidxray dicom-node run0 --port "$node_port" --out out > node1.log 2>&1 & node=$!
sleep 25
python - "$node_port" "$work" <<'PY'
import sys, pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
port, work = int(sys.argv[1]), sys.argv[2]
ae = AE(ae_title="HOSTILE")
for study in (f"../../../../{work}/escaped", f"{work}/escaped-abs", "1.2.3.4"):
    film = pydicom.dcmread("film.dcm")
    film.StudyInstanceUID = study
    film.SOPInstanceUID = film.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if study == "1.2.3.4":
        film.StudyDate = "notadate"
    ae.requested_contexts = []
    ae.add_requested_context(film.SOPClassUID, film.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="COVIDXRAY")
    print(f"StudyInstanceUID {study!r}: status 0x{assoc.send_c_store(film).Status:04X}")
    assoc.release()
PY
kill $node; wait $node 2>/dev/null
grep -E "refused|not a valid" node1.log | sed 's/^/  log: /'
echo "  written: $(find out -name '*.dcm' | wc -l) under out/; outside: $(ls -d escaped* 2>/dev/null | wc -l)"

echo "== 2. DICOM node --send-to a PACS that is down, killed, then the PACS comes up"
node_port=$(port); pacs_port=$(port); http_port=$(port)
covidxray dicom-node run0 --port "$node_port" --send-to "ORTHANC@127.0.0.1:$pacs_port" --outbox outbox --timeout 5 > node2.log 2>&1 & node=$!
sleep 25
storescu -aec COVIDXRAY 127.0.0.1 "$node_port" film.dcm; echo "  storescu exit $?"
sleep 2; kill -9 $node; wait $node 2>/dev/null
covidxray dicom-node run0 --status --outbox outbox
cat > orthanc.json <<EOF
{"Name": "h34", "StorageDirectory": "$work/orthanc-storage", "IndexDirectory": "$work/orthanc-index",
 "HttpPort": $http_port, "DicomPort": $pacs_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": false,
 "AuthenticationEnabled": false, "DicomCheckCalledAet": false}
EOF
Orthanc orthanc.json > orthanc.log 2>&1 & orthanc=$!
sleep 5
covidxray dicom-node run0 --port "$node_port" --send-to "ORTHANC@127.0.0.1:$pacs_port" --outbox outbox --timeout 5 > node3.log 2>&1 & node=$!
sleep 30
echo "  Orthanc holds $(curl -s http://127.0.0.1:$http_port/instances | python -c 'import json,sys; print(len(json.load(sys.stdin)))') instances; outbox: $(ls outbox/*.dcm 2>/dev/null | wc -l) waiting"
grep -E "wait|from before" node2.log node3.log | sed 's/^/  log: /' | head -4
kill $node $orthanc; wait $node $orthanc 2>/dev/null

echo "== 3. DICOM node --out not writable"
read_only ro-out
covidxray dicom-node run0 --port 0 --out ro-out; echo "  exit $?"

echo "== 4. archive: a file half-copied, then complete; links; an --out that cannot be written"
mkdir -p arch/sub other && cp tiny/COVID/*_000[0-2].png arch/ && cp tiny/NON-COVID/*_000[0-1].png other/
half=$(ls arch/*.png | head -1); cp "$half" whole.png; head -c 300 whole.png > "$half"
ln -s ../other arch/linked; ln -s ../arch other/loop; ln -s missing.png arch/gone.png
covidxray predict run0 arch --out arch.csv --quiet; echo "  exit $?"
cp whole.png "$half"
covidxray predict run0 arch --out arch.csv --quiet; echo "  exit $?"
read_only ro
covidxray predict run0 "$film" --out ro/scores.csv; echo "  exit $?"

echo "== 5. export over another run; a truncated model.onnx"
covidxray export run0 --out run1; echo "  exit $?"; ls run1 | tr '\n' ' '; echo
covidxray export run0 --out export0 > /dev/null && head -c 5000 export0/model.onnx > cut.onnx && mv cut.onnx export0/model.onnx
covidxray predict export0 "$film"; echo "  exit $?"

echo "== 6. server: its record file moved away, then its folder blocked; --queue out of range"
python - <<'PY'
import os, pathlib
from fastapi.testclient import TestClient
from covidxray.config import ServeConfig
from covidxray.deploy.serve.app import create_app
film = sorted(pathlib.Path("tiny/COVID").glob("*.png"))[0].read_bytes()
client = TestClient(create_app("run0", settings=ServeConfig(
    allowed_hosts=("testserver",), audit_db="sqlite:///record/predictions.sqlite")))
post = lambda: client.post("/api/predict", files={"files": ("x.png", film)}).status_code
print("  before:", post()); os.rename("record/predictions.sqlite", "rotated.sqlite")
print("  moved away:", post(), "| /health", client.get("/health").status_code)
os.remove("record/predictions.sqlite"); os.rmdir("record"); open("record", "w").write("x")
print("  blocked:", post(), "| /health", client.get("/health").json())
print("  " + [l for l in client.get("/metrics").text.splitlines() if 'status="503"' in l][0])
PY
for q in -1 0; do covidxray serve run0 --queue $q; echo "  exit $?"; done
covidxray serve run0 --workers -2; echo "  exit $?"

echo "== 7. run files tampered with"
cp -r run0 bad && python - <<'PY'
import json
m = json.load(open("bad/metadata.json")); m["test_time_views"] = -5
json.dump(m, open("bad/metadata.json", "w"))
PY
covidxray predict bad "$film"; echo "  exit $?"
cp run0/metadata.json bad/ && python -c "
import json; m = json.load(open('bad/metadata.json')); m['temperature'] = -1; json.dump(m, open('bad/metadata.json', 'w'))"
covidxray predict bad "$film"; echo "  exit $?"
cp run0/metadata.json bad/ && python -c "
import json; m = json.load(open('bad/metadata.json')); m['preprocessing']['image_size'] = 96; json.dump(m, open('bad/metadata.json', 'w'))"
covidxray predict bad "$film"; echo "  exit $?"
cp run0/metadata.json bad/ && head -c 4000 run0/ood.npz > bad/ood.npz
covidxray predict bad "$film"; echo "  exit $?"
covidxray predict bad "$film" --no-gate --quiet > /dev/null; echo "  --no-gate: exit $?"
cp run0/ood.npz bad/ && head -c 300 run0/conformal.npz > bad/conformal.npz
covidxray predict bad "$film"; echo "  exit $?"
python - <<'PY'
from covidxray.run.conformal import ConformalSets
s = ConformalSets.load("run0/conformal.npz"); ConformalSets(["CAT", "DOG"], s.calibration, s.confidence).save("bad/conformal.npz")
PY
covidxray predict bad "$film"; echo "  exit $?"
cp run0/conformal.npz bad/ && python -c "
import json; m = json.load(open('bad/metadata.json')); m['members'] = ['.']; json.dump(m, open('bad/metadata.json', 'w'))"
covidxray predict bad "$film"; echo "  exit $?"

echo "== 8. films that are not frontal chest X-rays, with the ready model"
nf=$REPO/../shared/data/not-frontal
if [ -d "$nf" ]; then
  covidxray predict lite0-cxrdev "$nf" --out nf.csv --quiet 2>/dev/null
  python -c "
import csv, collections; rows = list(csv.DictReader(open('nf.csv')))
print('  ', len(rows), 'films:', dict(collections.Counter(r['verdict'] for r in rows)))"
else echo "  (no not-frontal data here)"; fi

echo "== 9. jax, 2 devices, 12 films a class (16 in training), every epoch option at 1"
rm -rf twelve && python - <<'PY'
from covidxray.data.synthetic import make_synthetic_dataset
make_synthetic_dataset("twelve", n_per_class=12, size=96, seed=3)
PY
KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 timeout 900 covidxray train twelve --out jax-run --weights none --image-size 64 --distribute --head-epochs 1 --finetune-epochs 1 --patience 1 --test-time-views 1 --head-views 1 2>&1 | grep -E "data parallel|batches of|phase|error|validation" | head -8
echo "  exit ${PIPESTATUS[0]}"
