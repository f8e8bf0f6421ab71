"""The typed settings of a training run, saved to ``RUN/config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from covidxray.errors import ConfigError
from covidxray.fileutil import write_text_atomic

RESEARCH_NOTICE = ("Research use only. Not a medical device: not for diagnosis, triage or any "
                   "clinical decision.")
# what every figure of a run's own data does not show (the report, the model card)
STAND_IN_CAVEAT = ("In-domain validation and held-out sources of the training data are weak "
                   "stand-ins for a new hospital: a model can learn what a collection shares "
                   "(its scanners, processing, framing) instead of the disease. Check it on "
                   "labelled films of your own hospital before trusting it there.")

# grey-level normalisation of every image (covidxray.pixels.transforms.normalise_intensity)
INTENSITY_MODES = ("none", "percentile", "equalize", "clahe")
# Preprocessing.crop: the lungs' box instead of a fixed fraction of each side
LUNG_CROP = "lungs"
# what a lung crop cuts from each side of a film on which no plausible lungs are found
LUNG_FALLBACK_CROP = 0.08
# Preprocessing.fill: what is filled with the film's mean grey level before the model sees it
FILL_MODES = ("none", "outside-lungs")
# the Kaggle data set of the reference design, what 'covidxray data download' fetches by default
KAGGLE_DATASET = "akhilkasare/covid19-chest-xray-detection"
DOWNLOAD_FOLDER = "data"  # where 'covidxray data download' puts it
# what answers for a trained run: its classifier exported once for onnxruntime (no Keras,
# PyTorch or JAX imported), or the Keras model itself; the first is the default
RUNTIMES = ("onnx", "keras")
EXPORT_FORMATS = ("onnx",)  # what 'covidxray export' writes; the first is the default


@dataclass(frozen=True)
class Preprocessing:
    """What every image goes through before the model; one value per run, in its metadata.

    ``crop`` removes that fraction of each side first (text, markers, collimation edges), or,
    ``"lungs"``, keeps the box of the lungs the lung segmenter finds, with a margin
    (``covidxray.model.lungs``; a film without plausible lungs falls back to
    ``LUNG_FALLBACK_CROP``); ``intensity`` normalises the grey levels (``INTENSITY_MODES``);
    then the image is resized to ``image_size`` square and quantised to uint8
    (``covidxray.pixels.preprocess.prepare``). The backbone's own preprocessing lives inside the
    model.
    """

    image_size: int
    intensity: str = "none"
    crop: float | str = 0.0
    # "outside-lungs": everything but the lungs found (grown by pixels.transforms.LUNG_MARGIN)
    # filled with the film's mean grey level, so that text, markers, borders and the body
    # around the lungs cannot tell the model which collection a film came from (a film
    # without plausible lungs keeps them; the gate flags it)
    fill: str = "none"

    @property
    def name(self) -> str:
        """Short and unique, for cache folders."""
        crop = self.crop if isinstance(self.crop, str) else f"{self.crop:g}"
        fill = "" if self.fill == "none" else f"-fill-{self.fill}"
        return f"{self.image_size}px-{self.intensity}-crop{crop}{fill}"

    @property
    def lung_crop(self) -> bool:
        return self.crop == LUNG_CROP

    @property
    def uses_lungs(self) -> bool:
        """Whether the lungs must be found first (a lung crop, or a fill outside them)."""
        return self.lung_crop or self.fill != "none"


def check_crop(crop) -> None:
    """A crop is a fraction of each side in [0, 0.5), or LUNG_CROP."""
    if crop == LUNG_CROP:
        return
    if isinstance(crop, str) or not 0 <= crop < 0.5:
        raise ConfigError(f"crop must be a fraction in [0, 0.5) or {LUNG_CROP!r}, got {crop!r}")


def parse_same_patients(entries) -> dict[str, str]:
    """``TrainConfig.same_patients`` (or ``same_sources``): "a=b" entries as {a: b}."""
    aliases = {}
    for entry in entries:
        alias, equals, name = entry.partition("=")
        if not (equals and alias.strip() and name.strip()):
            raise ConfigError(f"{entry!r}: expected NAME=NAME, e.g. ieeefull=ieee")
        aliases[alias.strip()] = name.strip()
    return aliases


@dataclass
class AugmentConfig:
    """Random transforms applied to training images only (Keras preprocessing layers)."""

    rotation_degrees: float = 5.0
    zoom: float = 0.1
    translation: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    horizontal_flip: bool = False  # off: the heart is on the left in every frontal film

    def enabled(self) -> bool:
        return any([self.rotation_degrees, self.zoom, self.translation, self.brightness,
                    self.contrast, self.horizontal_flip])


# what `covidxray audit --fail-on` can fail on
AUDIT_FINDINGS = ("leak", "conflict", "duplicate", "confounding")

# "cosine": warm-up over the first tenth of a phase's steps, then cosine decay to zero
SCHEDULES = ("constant", "cosine")

# What a setting left at None becomes, by the weights (docs/model-quality.md has the evidence).
# The default changes only on figures measured outside cxr-dev (twice the in-house table and a
# new hospital disagreed). Pretrained: the head alone on the frozen backbone's last stage, no
# fine-tuning, on histogram-equalised films with 8% cut off each side. Outside cxr-dev this
# held a Spanish hospital at 0.902 / 0.887 / 0.868 ROC-AUC over three seeds, where fine-tuning
# the top stage fell to 0.74 and the four pooled stages with the lung crop (the in-house
# winner) to 0.764: early stages carry the texture and grey-level detail that names a
# collection. From random weights (small from-scratch models): every stage at 1e-3, equalised
# and cropped images, source-cue augmentation, and 16 test-time views to carry its threshold
# to new sources.
RECIPES = {
    "pretrained": {"head_epochs": 10, "head_learning_rate": 1e-3, "finetune_epochs": 0,
                   "finetune_learning_rate": 1e-4, "unfreeze_stages": 1,
                   "intensity": "equalize", "crop": 0.08, "pooled_stages": 1,
                   "source_augment": False, "test_time_views": 0},
    "random": {"head_epochs": 0, "head_learning_rate": 1e-3, "finetune_epochs": 15,
               "finetune_learning_rate": 1e-3, "unfreeze_stages": "all",
               "intensity": "equalize", "crop": 0.08, "pooled_stages": 1,
               "source_augment": True, "test_time_views": 16},
}


# the sensitivity the "sensitivity" threshold method reaches unless told another
DEFAULT_TARGET_SENSITIVITY = 0.95


@dataclass
class TrainConfig:
    """Everything that decides what ``covidxray train`` does."""

    data: str | list[str]  # a data set, or several (their sources and patients kept apart)
    out: str
    image_size: int = 224
    # None here and below: the recipe for the weights (RECIPES)
    intensity: str | None = None  # grey-level normalisation of every image: INTENSITY_MODES
    # fraction of each side cut off every image before resizing, or "lungs" (Preprocessing)
    crop: float | str | None = None
    fill: str = "none"  # "outside-lungs": only the lungs are left to see (Preprocessing)
    backbone: str = "resnet50"
    weights: str = "imagenet"  # "imagenet", "none" or a path to a weights file
    dropout: float = 0.3
    # the head reads the pooled outputs of this many of the backbone's top stages (1: the last)
    pooled_stages: int | None = None
    # None: COVID against the rest (one sigmoid unit). Three or more names, e.g. ("covid",
    # "pneumonia", "normal"): a softmax over those classes (each data label must be one of
    # them, case aside); P(COVID) and its threshold as ever, the others' beside it
    classes: tuple[str, ...] | None = None
    batch_size: int = 32
    # pretrained weights train the head on a frozen backbone, then fine-tune the top stage;
    # random weights must train every stage
    head_epochs: int | None = None  # phase 1: frozen backbone; 0 skips it
    head_learning_rate: float | None = None
    finetune_epochs: int | None = None  # phase 2: top stage(s) unfrozen; 0 skips it
    finetune_learning_rate: float | None = None
    unfreeze_stages: int | str | None = None  # a number from the top, or "all" (stem included)
    patience: int = 3  # early stopping on validation ROC-AUC
    schedule: str = "constant"  # learning rate of each phase: SCHEDULES
    # phase 1 trains the head on backbone features computed once per image (and per augmented
    # view) instead of running the frozen backbone every epoch; see covidxray.training.features
    cached_head: bool = True
    head_views: int = 0  # augmented views per training image for the cached head, besides itself
    feature_cache: str | None = None  # a folder keeps the features for later runs too
    # phase 2 of a pretrained backbone (BatchNorm frozen, some stages frozen) trains the top
    # stages on the frozen trunk's output, computed once per image and view; source-cue
    # augmentation gives each epoch its own view, and Keras' augmentation layers are not used
    cached_trunk: bool = True
    # phase 2 (and an uncached phase 1) read training batches from the files in worker threads
    stream: bool = False
    image_cache: str | None = None  # with stream: keep decoded, resized images here
    workers: int = 2
    mixed_precision: str = "auto"  # bfloat16 on a GPU; "on" or "off" to choose
    # data parallel over every accelerator (and host) on the jax backend; batch_size is global
    distribute: bool = False
    class_weights: bool = True  # each class weighs the same in the loss
    # and, first, each source's classes weigh the same within that source
    source_balance: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # random gamma, blur / noise, JPEG quality, borders and crops (transforms.SourceAugment)
    # on the training images of phase 2: cues that name a source rather than the disease
    source_augment: bool | None = None
    # test-time augmentation: every score (the threshold's on validation included) is the mean
    # over the image and this many seeded source-cue views of it
    test_time_views: int | None = None
    split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    split_file: str | None = None  # reuse an earlier split.csv
    seed: int = 0
    positive_class: str | None = None  # default: the folder whose name says covid
    # "youden" (maximise sensitivity + specificity - 1) or "sensitivity" (the highest threshold
    # reaching target_sensitivity); None: "sensitivity" where a target is given, else "youden"
    threshold_method: str | None = None
    target_sensitivity: float | None = None  # None: DEFAULT_TARGET_SENSITIVITY
    calibrate: bool = False  # fit a temperature on validation and apply it to every score
    # prediction sets (run.conformal): the share of films of each class whose set holds their
    # class, on films like the validation ones
    confidence: float = 0.90
    source_from_prefix: bool = False
    # patient-id namespaces that name the same patients, "a=b": a:12 is b:12 (data sets that
    # say so, as cxr-ieee-extra's ieeefull:N and cxr-dev's ieee:N do)
    same_patients: tuple[str, ...] = ()
    # sources that are one, "a=b": source a is read as b (two copies of one collection, so
    # that leave-one-source-out holds both out together)
    same_sources: tuple[str, ...] = ()
    # the sources trained on (and validated, tested) when the data names them; the others are
    # left out, each named in the log and the run's metadata with the reason
    sources: tuple[str, ...] | None = None  # only these; None: all
    exclude_sources: tuple[str, ...] = ()
    # leave out what data.sources.confounded_sources names (data that names no sources: nothing)
    exclude_confounded: bool = True
    strict: bool = False
    allow_leaks: bool = False  # train even when identical files sit in different splits
    # labelled films of a source not trained on (the user's own hospital, a held-out source):
    # they, not the validation split, choose the epoch and phase whose weights are kept
    select_on: str | None = None
    lung_model: str | None = None  # a folder of lung-segmenter weights; None: the shipped one

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        self.sources = None if self.sources is None else tuple(self.sources)
        self.same_patients = tuple(self.same_patients)
        self.same_sources = tuple(self.same_sources)
        if self.classes is not None:
            self.classes = tuple(self.classes)
        if isinstance(self.data, (list, tuple)):
            self.data = [str(d) for d in self.data] if len(self.data) > 1 else str(self.data[0])
        self.exclude_sources = tuple(self.exclude_sources)
        if self.threshold_method is None:
            self.threshold_method = "youden" if self.target_sensitivity is None else \
                "sensitivity"
        if self.target_sensitivity is None:
            self.target_sensitivity = DEFAULT_TARGET_SENSITIVITY
        recipe = RECIPES["random" if self.weights.lower() == "none" else "pretrained"]
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.intensity, self.crop, self.fill)

    @property
    def patient_aliases(self) -> dict[str, str]:
        return parse_same_patients(self.same_patients)

    @property
    def source_aliases(self) -> dict[str, str]:
        return parse_same_patients(self.same_sources)

    def validate(self) -> None:
        if self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32, got {self.image_size}")
        if self.head_epochs < 0 or self.finetune_epochs < 0:
            raise ConfigError("epochs cannot be negative")
        if self.head_epochs == 0 and self.finetune_epochs == 0:
            raise ConfigError("both training phases are skipped: nothing to train")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 \
                or min(self.split_fractions) < 0:
            raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, "
                             f"got {self.split_fractions}")
        if self.threshold_method not in ("youden", "sensitivity"):
            raise ConfigError(f"threshold_method must be 'youden' or 'sensitivity', "
                             f"got {self.threshold_method!r}")
        if not 0 < self.target_sensitivity <= 1:
            raise ConfigError("target_sensitivity must be in (0, 1]")
        if self.unfreeze_stages != "all" and not (isinstance(self.unfreeze_stages, int)
                                                  and self.unfreeze_stages >= 1):
            raise ConfigError(f"unfreeze_stages must be a positive number or 'all', "
                             f"got {self.unfreeze_stages!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"intensity must be one of {INTENSITY_MODES}, got "
                             f"{self.intensity!r}")
        check_crop(self.crop)
        if self.fill not in FILL_MODES:
            raise ConfigError(f"fill must be one of {FILL_MODES}, got {self.fill!r}")
        if self.mixed_precision not in ("auto", "on", "off"):
            raise ConfigError(f"mixed_precision must be auto, on or off, got "
                             f"{self.mixed_precision!r}")
        if self.head_views < 0 or self.test_time_views < 0:
            raise ConfigError("head_views and test_time_views cannot be negative")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout must be in [0, 1)")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.pooled_stages < 1:
            raise ConfigError("pooled_stages must be at least 1")
        parse_same_patients(self.same_patients)
        parse_same_patients(self.same_sources)
        if self.classes is not None and (len(self.classes) < 3 or len(
                {c.lower() for c in self.classes}) < len(self.classes)):
            raise ConfigError(f"classes must be three or more different names, got "
                             f"{self.classes!r} (two classes: leave it out)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        values = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def check_runtime(name: str) -> None:
    if name not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {RUNTIMES}, got {name!r}")


def check_ranges(settings, ranges: dict[str, tuple]) -> None:
    """Each named setting a number in its (low, high) range (None: open); None values (not
    set) pass. Raises ``errors.ConfigError`` naming the setting and the range."""
    for name, (low, high) in ranges.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (low is not None and value < low) or (high is not None and value > high):
            allowed = (f"from {low} to {high}" if high is not None else f"at least {low}")
            raise ConfigError(f"{name.replace('_', '-')} {value!r} is out of range: "
                              f"{allowed}")


@dataclass(frozen=True)
class PredictConfig:
    """Defaults of ``covidxray predict`` (and ``score``, archive scoring)."""

    batch_size: int = 32  # films per forward pass
    runtime: str = RUNTIMES[0]  # RUNTIMES
    engine: str = "local"  # archives: this process, or "ray" (Ray Data)
    ray_workers: int = 2  # with the Ray engine: scoring actors, each with the model loaded once
    retry_errors: bool = True  # an archive's files that could not be read are tried again
    chunk: int = 256  # an archive's result rows written at a time

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        check_ranges(self, {"batch_size": (1, 4096), "ray_workers": (1, 1024),
                            "chunk": (1, None)})


@dataclass(frozen=True)
class LungTrainConfig:
    """Defaults of ``covidxray lungs train``: the lung segmenter's U-Net and its training."""

    image_size: int = 128  # square input, a multiple of 2 ** depth
    base_filters: int = 8  # doubling at each of the depth poolings
    depth: int = 4
    epochs: int = 100  # at most: the best epoch by validation Dice is kept
    batch_size: int = 16
    seed: int = 0  # the split by patient and the training
    patience: int = 15
    learning_rate: float = 2e-3
    licence: str = ""  # what the model card says of the masks' and images' licences

    def __post_init__(self) -> None:
        check_ranges(self, {"image_size": (16, 1024), "base_filters": (1, 256),
                            "depth": (1, 8), "epochs": (1, None), "batch_size": (1, None),
                            "patience": (1, None), "learning_rate": (1e-8, 1.0)})
        if self.image_size % (2 ** self.depth):
            raise ConfigError(f"the lung segmenter's image size {self.image_size} must divide "
                              f"by {2 ** self.depth} (2 ** depth)")


@dataclass(frozen=True)
class ReadLimits:
    """What a file may declare before it is decoded (the command line and API; the server
    has its own, smaller, in ``ServeConfig``)."""

    # per image, from the header; below Pillow's own decompression-bomb error (179 M)
    max_pixels: int = 150_000_000


@dataclass(frozen=True)
class EvaluationConfig:
    """Defaults of evaluate, crossval, explain and report."""

    bootstrap: int = 1000  # resamples for the 95% intervals of evaluate
    crossval_bootstrap: int = 500  # and of each cross-validation fold
    shortcut_images: int = 200  # images for the border-shortcut check (0 skips it)
    heatmap_alpha: float = 0.4  # opacity of a Grad-CAM overlay
    # audit: near duplicates at this difference-hash distance or less, of 256 bits
    # (re-encodings and small re-crops stay below it)
    near_distance: int = 12
    report_file: str = "report.html"  # covidxray report's output
    audit_file: str = "audit.json"  # covidxray audit's output


@dataclass(frozen=True)
class ServeConfig:
    """Defaults of ``covidxray serve``."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0  # request size limit, answered 413
    max_pixels: int = 60_000_000  # per image, from the header, before decoding (7000x8000)
    max_files: int = 16  # per request, answered 413
    # per request, the sum of what the headers declare, answered 413: a few large films
    max_request_pixels: int = 120_000_000
    # requests waiting for the model beyond the one it runs; more are answered 503
    queue: int = 4
    # Host headers answered (DNS rebinding): loopback unless the server is meant to be reached
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")
    cors_origins: tuple[str, ...] = ()  # other sites' pages that may call the API: none
    api_keys: str | None = None  # a file of "id:sha256" lines: every API call needs a key
    # wrong keys a client address may send before each further one locks it out for twice as
    # long as the last (1 s, 2 s, ... 5 min), answered 429
    key_failures_allowed: int = 5
    audit_db: str | None = None  # SQLAlchemy URL of the prediction record (default: SQLite)
    workers: int = 1  # processes, each with the model loaded once
    gate: bool = True  # False: no out-of-distribution gate (a damaged gate file otherwise stops)
    runtime: str = RUNTIMES[0]  # RUNTIMES
    # the films waiting when the model is free share one forward pass, up to batch_films
    # (deploy.serve.batching); batch_wait_ms > 0 holds a pass that long for more. 0: on a CPU
    # a film costs onnxruntime as much in a batch as alone, and a 5 ms wait cut a server's
    # answers from 52 to 45 a second (docs/benchmarks.md); Triton's default too
    batch_films: int = 32
    batch_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        check_ranges(self, {"port": (0, 65535), "max_upload_mb": (0.001, None),
                            "batch_films": (1, 1024), "batch_wait_ms": (0, 1000),
                            "max_pixels": (1, None), "max_files": (1, None),
                            "max_request_pixels": (1, None), "queue": (1, 10_000),
                            "key_failures_allowed": (0, None), "workers": (1, 256)})


@dataclass(frozen=True)
class DicomNodeConfig:
    """Settings of ``covidxray dicom-node``."""

    ae_title: str = "COVIDXRAY"
    host: str = "127.0.0.1"  # loopback unless the node is meant to be reached
    port: int = 11112
    allowed_aes: tuple[str, ...] = ()  # calling AE titles that may associate (empty: any)
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "::1")  # peer addresses that may connect
    send_to: str | None = None  # AE@host:port of the results' destination (the PACS)
    out: str | None = None  # a folder for the results as files
    max_associations: int = 8
    max_pdu: int = 65536  # bytes per PDU received
    max_instances: int = 1000  # per association
    max_instance_mb: float = 64.0  # one instance's size, as received
    max_pixels: int = 60_000_000  # per instance, every frame counted, from the header
    timeout_s: float = 30.0  # ACSE, DIMSE and network timeouts
    tls_cert: str | None = None  # with tls_key: TLS, and only TLS
    tls_key: str | None = None
    tls_ca: str | None = None  # with it: clients must show a certificate it signed
    audit_db: str | None = None  # the prediction record (default: SQLite in RUN/serve/)
    metrics_port: int | None = None  # Prometheus metrics on this loopback port
    gate: bool = True  # False: no out-of-distribution gate (a damaged gate file otherwise stops)
    # with send_to: results wait here (durably) until the PACS takes them; None: RUN/serve/outbox
    outbox: str | None = None
    outbox_expiry_h: float = 168.0  # a result waiting longer is set aside in outbox/expired/
    runtime: str = RUNTIMES[0]  # RUNTIMES

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        check_ranges(self, {"port": (0, 65535), "max_associations": (1, 1000),
                            "outbox_expiry_h": (0.001, None),
                            "max_pdu": (16_384, 2 ** 31 - 1), "max_instances": (1, None),
                            "max_instance_mb": (0.001, None), "max_pixels": (1, None),
                            "timeout_s": (0.1, 3600), "metrics_port": (1, 65535)})


@dataclass(frozen=True)
class DemoConfig:
    """Defaults of ``covidxray demo``: the whole pipeline in a few minutes on a CPU."""

    image_size: int = 64
    epochs: int = 6
    n_per_class: int = 80  # synthetic images per class
    seed: int = 0
    out: str = "demo-run"  # the folder for everything it writes


READ = ReadLimits()
PREDICT = PredictConfig()
LUNG_TRAINING = LungTrainConfig()
EVALUATION = EvaluationConfig()
SERVE = ServeConfig()
DICOM_NODE = DicomNodeConfig()
DEMO = DemoConfig()
