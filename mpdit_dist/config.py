"""One typed config tree: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.

Built on OmegaConf structured configs, so unknown keys and wrong types are errors that name the
key. The resolved tree is written to the run directory as ``config.yaml``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: F401  (MISSING re-exported for configs)
from omegaconf.errors import OmegaConfBaseException


# data.latent_stats: the dataset manifest's measured statistics, or the official code's constants
LATENT_STATS = ("measured", "official")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (names the key)."""


@dataclass
class ModelConfig:
    name: str = "MPDiT-XL/4x"
    # overrides of the named config; None keeps the named config's value
    stages: Optional[list[list[int]]] = None  # [[patch, depth], ...] coarse to fine
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    num_condition_tokens: int = 16
    time_embed: str = "fno"
    skip_connection: bool = True
    attention: str = "auto"


@dataclass
class FlowConfig:
    time_sampler: str = "lognormal"  # lognormal | uniform
    p_mean: float = 0.0
    p_std: float = 1.0
    loss_weighting: str = "uniform"  # uniform | snr | min_snr
    class_dropout: float = 0.1


@dataclass
class DataConfig:
    format: str = "mds"  # mds | wds | memory
    path: str = ""  # shard root holding manifest.json (memory: a .npz or a built-in dataset name)
    global_batch_size: int = 256
    micro_batch_size: Optional[int] = None  # per rank; None = global / world (no accumulation)
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True
    shuffle: bool = True
    normalize: bool = True  # standardise latents with the manifest's per-channel mean/std
    # which per-channel mean/std: measured (the dataset manifest's) | official (the official code's fixed
    # SD-VAE constants, what its recipes train with)
    latent_stats: str = "measured"
    remote: Optional[str] = None  # remote store for MDS (s3://, gs://, ...) or wds URL prefix
    cache_dir: Optional[str] = None  # local cache for a remote store
    audit: bool = False  # log the sample keys each rank trains on to <run>/audit/rank{R}.jsonl
    # a batch that has not come after this long (a hung file system) ends the rank with an error
    # naming the step and the data; 0: wait forever (the other ranks then wait up to the process
    # group's timeout, 30 min, and one process alone forever)
    read_timeout_s: float = 1800.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # <= 0 disables
    fused: Optional[bool] = None  # None: fused on CUDA, foreach elsewhere


@dataclass
class EMAConfig:
    decay: float = 0.9999
    # warm-up: decay_t = min(decay, (1 + t) / (10 + t)), so short runs get a useful EMA
    warmup: bool = True
    start_step: int = 0


@dataclass
class TrainConfig:
    steps: int = 400_000
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 100
    ckpt_every: int = 5000
    sample_every: int = 10000
    sample_classes: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    sample_cfg_scale: float = 4.0
    sample_steps: int = 50
    sample_sampler: str = "euler"
    eval_every: int = 0  # 0 = off; in-training FID on eval_num_samples
    eval_num_samples: int = 10000
    eval_cfg_scale: float = 1.5  # the official FID setting (its README: --cfg_scale 1.5), not the grids' scale
    eval_reference: Optional[str] = None  # ADM reference batch (.npz) or its cached statistics
    eval_inception: Optional[str] = None  # local FID-Inception weights (pt_inception-2015-12-05-*.pth)
    eval_input_size: int = 299  # the feature network's input size (299 as ADM; smaller only for tests)
    # weights-only warm start: a safetensors export, an official .pt, a checkpoint directory or a run
    # directory (its newest intact checkpoint's EMA weights, also while that run trains)
    init_from: Optional[str] = None
    progress_bar: bool = True
    device: str = "auto"  # auto | cpu | cuda
    profile_memory: bool = True  # log peak_mem_gib, the peak GPU memory allocated so far (CUDA only)
    # torch.profiler over steps profile_at .. profile_at + profile_steps - 1 (0 = off), every rank:
    # <run_dir>/profile/step_<first step recorded>/rank<R>.trace.json.gz, rank<R>.txt/.json (time by category)
    profile_at: int = 0
    profile_steps: int = 3


@dataclass
class CheckpointConfig:
    keep_last: int = 3
    keep_every: int = 0  # milestone period in steps (0: none)
    async_save: bool = False
    allow_batch_change: bool = False  # resume with another global batch (changes the data order)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # default: sqlite:///<results_dir>/mlflow.db
    experiment: str = "mpdit"
    run_name: Optional[str] = None


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto (ddp if world > 1 else none) | none | ddp | fsdp2 | deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage (1, 2, 3)
    deepspeed_config: Optional[str] = None  # a user's JSON, overriding the generated one
    hsdp_replicas: int = 1  # >1: HSDP, shard within groups of world/hsdp_replicas ranks
    param_dtype: str = "bf16"  # FSDP2 MixedPrecisionPolicy on GPU
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: str = "none"  # none | full | every_n
    ac_every: int = 2
    compile: bool = False  # torch.compile
    compile_scope: str = "blocks"  # blocks: each block alone (FSDP2-friendly) | model: the whole forward
    compile_mode: Optional[str] = None


@dataclass
class LaunchConfig:
    cluster: str = "slurm"  # slurm | local | debug
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None  # default: gpus_per_node (CPU jobs: set explicitly)
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60 * 24
    constraint: Optional[str] = None
    signal_delay_s: int = 120
    max_requeues: int = 10
    folder: Optional[str] = None  # submitit logs; default <run_dir>/submitit
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job
    # MLflow tags the launcher sets on the run (e.g. a study's point)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    results_dir: str = "results"
    run_name: Optional[str] = None


def refuse_below_one(ap, flags) -> None:
    """A command line's counts: ``ap.error`` (exit 2, naming the flag) for the first of the
    ``(flag, value)`` pairs whose value is below 1; a value of None is a flag left unset."""
    for flag, value in flags:
        if value is not None and value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")


def refuse_bad_output(ap, flag: str, path, suffixes: tuple[str, ...] = ()) -> None:
    """A command line's output file: ``ap.error`` (exit 2, naming the flag) where ``path`` is an
    existing directory, lies under an existing file, or (``suffixes``) ends otherwise; found before
    any work, not when the result is written at its end. None is a flag left unset."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        ap.error(f"{flag} {path} is a directory: give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        ap.error(f"{flag} {path}: give a {' or '.join(suffixes)} file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                ap.error(f"{flag} {path}: {parent} is a file, not a directory")
            break


def add_run_arguments(ap) -> None:
    """The command-line arguments every run entry point shares (train.py, slurm/submit.py)."""
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("--run-dir", default=None, help="run directory (default: <results_dir>/<run_name or model>)")
    ap.add_argument("--resume", default="auto", help="auto (newest checkpoint in the run dir), never, or a path")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")


def _wrap(exc: Exception, where: str) -> ConfigError:
    """One line naming where and the key: OmegaConf's first line (its message), without the lines of
    its own it adds (full_key, object_type); a YAML error's problem and line."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        line = f"line {mark.line + 1}: " if mark is not None and "<unicode string>" not in str(mark.name) else ""
        return ConfigError(f"{where}: not valid YAML: {line}{exc.problem or exc.context}")
    if isinstance(exc, yaml.YAMLError):
        return ConfigError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}")
    if isinstance(exc, TypeError):  # OmegaConf's bare "Cannot merge incompatible container types"
        return ConfigError(f"{where}: {exc} (a list where a mapping is expected, or the other way round)")
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _mismatched_key(schema: DictConfig, loaded: DictConfig, prefix: str = "") -> Optional[str]:
    """The dotted key of ``loaded`` that makes OmegaConf's merge into ``schema`` raise a bare TypeError
    (a list where a mapping is expected, or the other way round), found by merging one key at a time;
    None when no single key does."""
    for key, value in loaded.items():
        name = f"{prefix}{key}"
        try:
            OmegaConf.merge(schema, {key: value})
        except TypeError:
            if key in schema and OmegaConf.is_dict(schema[key]) and OmegaConf.is_dict(value):
                return _mismatched_key(schema[key], value, name + ".") or name
            return name
        except OmegaConfBaseException:  # another problem, reported by the whole merge's own error
            continue
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides (OmegaConf dotlist)."""
    import yaml

    schema = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if path.is_dir():
                raise ConfigError(f"config file {path} is a directory: give a YAML file")
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):  # a YAML list: OmegaConf's merge says only "TypeError"
                raise ConfigError(f"config file {path}: must hold a mapping of sections (model:, data:, "
                                  f"train:, ...), not a {type(loaded).__name__}")
            if not loaded:  # an empty (or truncated, or all-commented) file: every setting a default
                raise ConfigError(f"config file {path} holds no settings (empty): give its sections (model:, "
                                  "data:, train:, ...)")
            for key, value in OmegaConf.to_container(loaded, resolve=False).items():
                if key in schema and OmegaConf.is_dict(schema[key]) and not isinstance(value, dict):
                    raise ConfigError(f"config file {path}: {key}: must be a mapping of its settings "
                                      f"({key}:, then indented name: value lines), not {value!r}")
            try:
                schema = OmegaConf.merge(schema, loaded)
            except TypeError as exc:  # a list for a mapping, or the reverse: named by its key
                raise _wrap(exc, f"config file {path}: {_mismatched_key(schema, loaded) or 'a setting'}") from None
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise _wrap(exc, f"config file {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not a text (UTF-8) file: {exc.reason} at byte {exc.start}") from None
    bad = [o for o in overrides or [] if "=" not in o or "" in o.partition("=")[0].split(".")]  # "=5", "a..b=1"
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    for override in overrides or []:  # one at a time: an error names the override it comes from
        try:
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([override]))
        except (OmegaConfBaseException, yaml.YAMLError, TypeError) as exc:
            raise _wrap(exc, f"command-line override {override!r}") from None
    try:
        cfg: Config = OmegaConf.to_object(schema)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:  # an interpolation (${...}) that resolves to nothing or a wrong type
        raise _wrap(exc, "config") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need more than types; each error names the key and value."""
    from .distributed.parallelize import DTYPE_NAMES
    from .flow import SAMPLERS

    choices = {
        "data.format": (cfg.data.format, ("mds", "wds", "memory")),
        "flow.time_sampler": (cfg.flow.time_sampler, ("lognormal", "uniform")),
        "flow.loss_weighting": (cfg.flow.loss_weighting, ("uniform", "snr", "min_snr")),
        "optim.schedule": (cfg.optim.schedule, ("constant", "cosine")),
        "train.precision": (cfg.train.precision, ("auto", "bf16", "fp32")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "parallel.backend": (cfg.parallel.backend, ("auto", "none", "ddp", "fsdp2", "deepspeed")),
        "parallel.activation_checkpointing": (cfg.parallel.activation_checkpointing, ("none", "full", "every_n")),
        "launch.cluster": (cfg.launch.cluster, ("slurm", "local", "debug")),
        "parallel.compile_scope": (cfg.parallel.compile_scope, ("blocks", "model")),
        "parallel.param_dtype": (cfg.parallel.param_dtype, DTYPE_NAMES),
        "parallel.reduce_dtype": (cfg.parallel.reduce_dtype, DTYPE_NAMES),
        "train.sample_sampler": (cfg.train.sample_sampler, SAMPLERS),
    }
    if cfg.parallel.compile_mode is not None:  # torch.compile's modes (this torch's list)
        from torch._inductor import list_mode_options

        choices["parallel.compile_mode"] = (cfg.parallel.compile_mode, tuple(list_mode_options()))
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: choose one of {list(allowed)}")
    if cfg.parallel.compile and cfg.parallel.compile_mode is not None:
        from torch._inductor import list_mode_options

        if list_mode_options(cfg.parallel.compile_mode).get("triton.cudagraphs"):
            # CUDA graphs reuse their output buffers at the next replay: the loop would have to mark
            # each step, and the samplers (Heun keeps one velocity across the next call) to copy
            # every output. Neither is done nor tested; bench/throughput.py can still time them.
            raise ConfigError(
                f"parallel.compile_mode={cfg.parallel.compile_mode!r} records CUDA graphs, which the trainer "
                "does not support (its in-training sampling keeps model outputs across calls); use "
                "'max-autotune-no-cudagraphs' (the same autotuning without CUDA graphs) or leave it unset")
    # Integers that are divided by, counted with or indexed later: wrong ones would fail far into a
    # run with a bare ZeroDivisionError / IndexError that names no key.
    at_least = {
        "train.log_every": (cfg.train.log_every, 1),
        "train.sample_steps": (cfg.train.sample_steps, 1),
        "train.eval_input_size": (cfg.train.eval_input_size, 1),
        "data.num_workers": (cfg.data.num_workers, 0),
        "data.prefetch_factor": (cfg.data.prefetch_factor, 1),
        "data.read_timeout_s": (cfg.data.read_timeout_s, 0),
        "parallel.hsdp_replicas": (cfg.parallel.hsdp_replicas, 1),
        "parallel.ac_every": (cfg.parallel.ac_every, 1),
        "optim.warmup_steps": (cfg.optim.warmup_steps, 0),
        "train.profile_at": (cfg.train.profile_at, 0),
        # periods (0: off; a negative one was taken as off, silently) and the EMA's first step
        "train.ckpt_every": (cfg.train.ckpt_every, 0),
        "train.sample_every": (cfg.train.sample_every, 0),
        "train.eval_every": (cfg.train.eval_every, 0),
        "checkpoint.keep_every": (cfg.checkpoint.keep_every, 0),
        "ema.start_step": (cfg.ema.start_step, 0),
        # retention keeps at least the newest checkpoint: 0 or below was kept as 1, silently
        "checkpoint.keep_last": (cfg.checkpoint.keep_last, 1),
        # numpy's generators (the evaluation's class plan) take no negative seed: it failed at the first evaluation
        "train.seed": (cfg.train.seed, 0),
    }
    if cfg.data.micro_batch_size is not None:
        at_least["data.micro_batch_size"] = (cfg.data.micro_batch_size, 1)
    # the model's sizes (None keeps the named config's): zero or negative ones passed, to fail when
    # the model was built (a bare ZeroDivisionError, even from load_config for num_heads=0)
    for key in ("hidden_size", "num_heads", "input_size", "in_channels", "num_classes"):
        if getattr(cfg.model, key) is not None:
            at_least[f"model.{key}"] = (getattr(cfg.model, key), 1)
    if cfg.train.eval_every > 0:
        # precision/recall take each sample's 3 nearest neighbours: fewer than 4 failed at the first evaluation
        at_least["train.eval_num_samples"] = (cfg.train.eval_num_samples, 4)
    if cfg.train.profile_at > 0:
        at_least["train.profile_steps"] = (cfg.train.profile_steps, 1)
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    for key, value in _floats(cfg):
        if not math.isfinite(value):  # nan passes every comparison below, and would surface as a divergence
            raise ConfigError(f"{key}={value} must be a finite number")
    if cfg.model.mlp_ratio is not None and cfg.model.mlp_ratio <= 0:
        raise ConfigError(f"model.mlp_ratio={cfg.model.mlp_ratio} must be > 0")
    if cfg.model.stages is not None and not all(len(s) == 2 for s in cfg.model.stages):
        raise ConfigError(f"model.stages={cfg.model.stages}: each stage is a [patch_size, depth] pair")
    if cfg.flow.p_std <= 0:
        raise ConfigError(f"flow.p_std={cfg.flow.p_std} must be > 0")
    if cfg.data.latent_stats not in LATENT_STATS:
        raise ConfigError(f"data.latent_stats={cfg.data.latent_stats!r}: choose measured or official")
    if cfg.data.latent_stats == "official" and not cfg.data.normalize:
        raise ConfigError("data.latent_stats=official with data.normalize=false: the statistics standardise the "
                          "latents only with data.normalize=true")
    for key, value in (("optim.lr", cfg.optim.lr), ("optim.weight_decay", cfg.optim.weight_decay)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if cfg.optim.eps <= 0:
        raise ConfigError(f"optim.eps={cfg.optim.eps} must be > 0")
    if cfg.train.sample_every > 0 and not cfg.train.sample_classes:  # the grids' classes (evaluation uses all)
        raise ConfigError(f"train.sample_classes=[] with train.sample_every={cfg.train.sample_every}: name the "
                          "classes of the sample grids, or set train.sample_every=0")
    n = cfg.model.num_classes
    if cfg.train.sample_classes != TrainConfig().sample_classes and any(
            not 0 <= c < n for c in cfg.train.sample_classes):
        # the default (ImageNet) classes are wrapped for a model of fewer classes; classes a user
        # named were wrapped alike, silently (99 and -1 both drew class 9 of 10)
        raise ConfigError(f"train.sample_classes={cfg.train.sample_classes}: classes are 0..{n - 1} "
                          f"(model.num_classes={n})")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas} must be two values in [0, 1)")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    sharded_forward = cfg.parallel.backend == "fsdp2" or (cfg.parallel.backend == "deepspeed"
                                                          and cfg.parallel.zero_stage == 3)
    if cfg.train.eval_every > 0 and cfg.train.sample_sampler == "dopri5" and sharded_forward:
        # ranks sample different classes in evaluate(); dopri5 picks its step count from the data, so
        # ranks would run different numbers of forwards, and sharded weights need every rank in each
        raise ConfigError(f"train.sample_sampler=dopri5 with train.eval_every={cfg.train.eval_every} and "
                          f"parallel.backend={cfg.parallel.backend}: adaptive steps differ between ranks, whose "
                          f"sharded forwards must match; use euler, heun or euler_maruyama")
    if cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage == 3 and cfg.parallel.compile:
        # ZeRO-3 gathers each module's parameters in hooks that torch.compile may not trace
        raise ConfigError("parallel.compile=true with parallel.backend=deepspeed and parallel.zero_stage=3: "
                          "ZeRO-3's parameter hooks cannot be compiled through; use zero_stage<=2, or "
                          "parallel.backend=fsdp2 for sharded parameters with compile")
    # FSDP2's options, which the other backends would ignore (a run planned to fit by offloading or
    # by HSDP's smaller shard groups would then run out of memory, or silently train otherwise).
    # DeepSpeed's own ZeRO-Offload wants its CPU Adam (a C++ build) and is not supported here
    if cfg.parallel.backend != "fsdp2":
        for key, value, default in (("cpu_offload", cfg.parallel.cpu_offload, False),
                                    ("hsdp_replicas", cfg.parallel.hsdp_replicas, 1)):
            if value != default:
                raise ConfigError(f"parallel.{key}={value!r} is an FSDP2 option, but parallel.backend="
                                  f"{cfg.parallel.backend}: set parallel.backend=fsdp2 (or parallel.{key}={default!r})")
    if cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage}: choose 0, 1, 2 or 3")
    if cfg.data.global_batch_size < 1:
        raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} must be >= 1")
    if not 0.0 <= cfg.flow.class_dropout < 1.0:
        raise ConfigError(f"flow.class_dropout={cfg.flow.class_dropout} must be in [0, 1)")
    if not 0.0 <= cfg.ema.decay <= 1.0:
        raise ConfigError(f"ema.decay={cfg.ema.decay} must be in [0, 1]")
    if cfg.train.eval_every > 0 and not (cfg.train.eval_reference and cfg.train.eval_inception):
        raise ConfigError(
            f"train.eval_every={cfg.train.eval_every} needs train.eval_reference (a reference .npz) and "
            f"train.eval_inception (local Inception weights)"
        )
    if cfg.train.steps < 1:
        raise ConfigError(f"train.steps={cfg.train.steps} must be >= 1")
    if cfg.train.profile_at > cfg.train.steps:
        raise ConfigError(f"train.profile_at={cfg.train.profile_at} is beyond train.steps={cfg.train.steps}: "
                          "no step would be profiled")
    try:
        model_args_from(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _floats(node, prefix: str = ""):
    """(dotted key, value) of every float in the config tree (lists included)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _floats(value, key + ".")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def model_args_from(mcfg: ModelConfig):
    """``ModelConfig`` -> ``ModelArgs`` (named config + overrides)."""
    from .models import model_args

    over = {k: v for k, v in dataclasses.asdict(mcfg).items() if k != "name"}
    if over.get("stages") is not None:
        over["stages"] = tuple(tuple(s) for s in over["stages"])
    return model_args(mcfg.name, **over)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> Config:
    merged = OmegaConf.merge(OmegaConf.structured(Config), data)
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
