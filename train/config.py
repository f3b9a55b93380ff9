"""The training configuration: a typed schema (OmegaConf structured dataclasses), YAML presets
and `key=value` overrides.

Layering, lowest first (dinov2-style): the dataclass defaults below, `train/configs/defaults.yaml`
(the same values written out in full, so a user can read every knob in one file; a test keeps
the two equal), a preset (`--config quickstart` = `train/configs/quickstart.yaml`, or any YAML
path), then command-line overrides `optim.base_lr=3e-4 data.url=s3://bucket/in1k`.

Any unknown key or ill-typed value fails at start-up with `ConfigError`, whose message is one
sentence naming the key, the offending value, where it came from and what to do.
"""
from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lmim.model.config import COLLAPSE_METRICS, ModelConfig
from lmim.pipeline.config import REMOVED_DATA_KEYS, DataConfig, DataConfigError, check_data_config

__all__ = [
    "OptimConfig",
    "EMAConfig",
    "SimRegConfig",
    "CheckpointConfig",
    "EvalConfig",
    "CollapseGuardConfig",
    "TrainConfig",
    "ConfigError",
    "load_config",
    "preset_names",
    "preset_path",
    "save_config",
    "to_yaml",
    "effective_batch_size",
]


@dataclass
class OptimConfig:
    """AdamW with the lr schedule of the paper."""

    base_lr: float = 1.5e-4            # peak lr = base_lr * effective_batch / 256 (linear scaling rule)
    lr: Optional[float] = None         # absolute peak lr; overrides base_lr scaling when set
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05         # not on biases, norms, position/patch embeddings (model.param_groups)
    warmup_epochs: float = 40.0
    warmup_start_factor: float = 0.25  # warm-up goes linearly from 0.25 * lr to lr ...
    final_factor: float = 0.25         # ... then a half-cosine down to 0.25 * lr
    clip_grad: float = 0.0             # max grad norm; 0 = no clipping (the reference)


@dataclass
class EMAConfig:
    """Target-encoder momentum m: cosine from `start` to `end` over training, per optimizer step."""

    start: float = 0.99
    end: float = 1.0


@dataclass
class SimRegConfig:
    """Target s* of the similarity regulariser: cosine from `start` to `end` (used when
    model.sim_reg_coef > 0)."""

    start: float = 0.75
    end: float = 0.25


@dataclass
class CheckpointConfig:
    every_steps: int = 1000            # also one at the end of training; 0 = only at the end
    keep: int = 3                      # newest complete checkpoints kept (older ones are deleted)


@dataclass
class EvalConfig:
    """Periodic k-NN monitoring on `data.eval_url` (a labelled split)."""

    knn_every_epochs: int = 10         # 0 = only at the end (when data.eval_url is set)
    knn_train_url: Optional[str] = None  # labelled memory bank for weighted 20-NN; None = leave-one-out 1-NN on eval_url
    knn_k: int = 20
    knn_t: float = 0.07
    batch_size: int = 256              # per process, for feature extraction


@dataclass
class CollapseGuardConfig:
    """Warn (or stop) when `metric` stays above `threshold` (collapse_cos ~1.0 = all images alike)."""

    metric: str = "collapse_cos"
    threshold: float = 0.98
    patience: int = 3                  # consecutive logged steps above threshold before acting
    after_epochs: float = 1.0          # a freshly initialised ViT maps every image alike; judge only after this
    action: str = "warn"               # "warn" | "stop"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sim_reg: SimRegConfig = field(default_factory=SimRegConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)

    name: str = "lmim"                 # run name (TensorBoard project)
    run_dir: Optional[str] = None      # default: runs/<name>
    resume: Optional[str] = None       # None = fresh run | "auto" = newest complete checkpoint, if any | a checkpoint path
    epochs: int = 800
    max_steps: Optional[int] = None    # stop after this many optimizer steps; schedules still span `epochs`
    seed: int = 0
    device: str = "auto"               # "auto" | "cpu" | "cuda"
    precision: str = "auto"            # "auto" (bf16 where the hardware has it, else fp32) | "bf16" | "fp16" | "no" (fp32)
    grad_accum: int = 1
    threads: Optional[int] = None      # torch intra-op threads; null = the thread budget (CPU: every core of this process's share; GPU: 1)
    compile: bool = False              # torch.compile the model
    log_every: int = 20                # optimizer steps between logged metrics
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # "tensorboard", "wandb"
    progress: bool = True              # progress bar (main process)
    plots: bool = True                 # PNG curves + a mask picture at the end
    synthetic_batches: int = 50        # data.loader=synthetic: batches per epoch (benchmarks)
    debug_rank_log: bool = False       # every process logs a parameter hash + its batch keys per step (tests)


class ConfigError(ValueError):
    """A configuration problem, phrased as one sentence for the user."""


_CONFIG_DIR = "configs"
_CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "bf16", "fp16", "no"),
    "collapse_guard.action": ("warn", "stop"),
    "model.objective": ("infonce", "norm_l2", "mae", "naive_mse"),
    "model.target_sees": ("masked", "all"),
    "model.init": ("reference", "timm"),
}
# The trainer's own data loader on top of pipeline's (lmim/train/synthetic.py).
_TRAINER_LOADERS = ("synthetic",)


def _config_dir() -> Path:
    return Path(str(resources.files("lmim.train") / _CONFIG_DIR))


def preset_names() -> list[str]:
    """Names accepted by `--config NAME` (the YAML files shipped in train/configs/)."""
    return sorted(p.stem for p in _config_dir().glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """Resolve `--config`: an existing file path, or a preset name (with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    candidate = _config_dir() / f"{stem}.yaml"
    if "/" not in name_or_path and candidate.is_file():
        return candidate
    raise ConfigError(
        f"Config {name_or_path!r} is neither a YAML file nor a preset; choose one of "
        f"{', '.join(preset_names())} or give a path to a .yaml file."
    )


def _valid_keys(schema: DictConfig, full_key: str) -> list[str]:
    """The keys allowed in the section that holds `full_key` (for a did-you-mean hint)."""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node: Any = schema
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig):
        return []
    return [f"{parent}.{k}" if parent else str(k) for k in node.keys()]


# How a list-valued key is written, for the sentence that says a value is not a list.
_LIST_EXAMPLES = {"data.sources": ", e.g. 'data.sources=[{url: s3://b/a, weight: 3}, {url: s3://b/c, weight: 1}]'"}

_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _clean(msg: str) -> str:
    """OmegaConf's messages, minus internal placeholders and type names."""
    m = re.match(r"TupleConfig length (\d+) does not match type hint length (\d+)", msg)
    if m:
        return f"it takes {m.group(2)} items, got {m.group(1)}"
    msg = msg.replace("Value '$VALUE' of type '$VALUE_TYPE'", "an item")
    return re.sub(r" \(type \w+\)", "", msg).rstrip(".")


def _rephrase(err: OmegaConfBaseException, schema: DictConfig, source: str, key_hint: str = "") -> ConfigError:
    """Turn an OmegaConf exception (multi-line, internal type names) into one sentence."""
    full_key = getattr(err, "full_key", None) or key_hint
    if key_hint and full_key != key_hint and not full_key.startswith(key_hint.split(".")[0] + "."):
        full_key = f"{key_hint}[...].{full_key}"  # OmegaConf names only the key inside a list's entry
    if isinstance(err, ConfigKeyError) and full_key:
        valid = _valid_keys(schema, full_key)
        close = difflib.get_close_matches(full_key, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "run `lmim pretrain --print-config` to list the valid keys."
        return ConfigError(f"Unknown config key {full_key!r} ({source}); {hint}")
    msg = str(getattr(err, "msg", None) or str(err)).splitlines()[0]
    if full_key and re.search(r"is not a (List|Tuple)Config", msg):
        return ConfigError(f"Config key {full_key!r} must be a list, written [a, b], got {getattr(err, 'value', '?')!r} "
                           f"({source}){_LIST_EXAMPLES.get(full_key, '')}.")
    if isinstance(err, ValidationError) and full_key:
        if "is not a valid bool" in msg:
            return ConfigError(f"Config key {full_key!r} must be true or false, got {getattr(err, 'value', '?')!r} ({source}).")
        for word, phrase in _TYPE_WORDS.items():
            if msg.endswith(f"converted to {word}") and "$VALUE" not in msg:
                return ConfigError(
                    f"Config key {full_key!r} must be {phrase}, got {getattr(err, 'value', '?')!r} ({source})."
                )
        return ConfigError(f"Config key {full_key!r} has an invalid value ({source}): {_clean(msg)}.")
    if full_key:
        return ConfigError(f"Config key {full_key!r} has an invalid value ({source}): {_clean(msg)}.")
    return ConfigError(f"Invalid configuration ({source}): {_clean(msg)}.")


def _merge(base: DictConfig, overlay: Any, schema: DictConfig, source: str, key_hint: str = "") -> DictConfig:
    try:
        return OmegaConf.merge(base, overlay)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _rephrase(err, schema, source, key_hint) from None
    except TypeError as err:  # OmegaConf: a mapping where the schema has a list, or the other way round
        where = f"Config key {key_hint!r}" if key_hint else "A config value"
        raise ConfigError(f"{where} has the wrong shape ({source}): {err}; a list is written [a, b] and a "
                          "mapping {key: value}.") from None


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError, OSError: phrase them the same way
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"Cannot read config file {str(path)!r}: {first}.") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys, not a list or a value.")
    return loaded


def _drop_removed_keys(overlay: DictConfig, source: str) -> DictConfig:
    """Old configs may still set keys lmim no longer reads: say so once and drop them (they never
    changed anything, so the run is the same)."""
    data = overlay.get("data") if isinstance(overlay, DictConfig) else None
    if isinstance(data, DictConfig):
        for key, why in REMOVED_DATA_KEYS.items():
            if key in data:
                logging.getLogger("lmim.config").warning(
                    "Config key 'data.%s' (%s) is no longer used and was ignored: %s; delete it.", key, source, why)
                del data[key]
    return overlay


def _parse_override(item: str, schema: DictConfig) -> DictConfig:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"Override {item!r} is not of the form key=value (for example optim.base_lr=3e-4).")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as err:
        raise _rephrase(err, schema, f"override {item!r}") from None
    except yaml.YAMLError as err:  # the value is parsed as YAML: an unclosed [ or { ends here
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"Override {item!r}: its value is not valid YAML ({problem}); quote it, or close its "
                          "brackets (lists are written [a,b]).") from None


def _check_values(cfg: DictConfig) -> None:
    """Semantic checks the type system cannot express; each fails with one sentence."""
    # The name is a folder under run_dir/logs (TensorBoard) and the default run_dir runs/<name>: a path
    # in it would write the logs (or the run) outside the run folder.
    if not str(cfg.name).strip() or str(cfg.name) in (".", "..") or any(c in str(cfg.name) for c in "/\\"):
        raise ConfigError(f"Config key 'name' must be a plain name (no '/' or '\\', not '.' or '..'), got "
                          f"{cfg.name!r}; to put the run elsewhere set run_dir=PATH.")
    if "://" in str(cfg.run_dir):  # Path("s3://b/r") is the local folder s3:/b/r: the run would land on local disk
        raise ConfigError(f"Config key 'run_dir' is a URL ({cfg.run_dir}); the run folder must be a local path or a "
                          "mounted shared volume (checkpoints are renamed into place atomically).")
    # YAML reads a bare `no` as false: `precision=no` on a command line arrives as "False".
    if str(cfg.precision) in ("False", "false", "fp32", "none"):
        cfg.precision = "no"
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"Config key {key!r} must be one of {', '.join(choices)}, got {value!r}.")
    positive = ["epochs", "grad_accum", "log_every", "eval.batch_size", "eval.knn_k", "checkpoint.keep",
                "model.patch_size", "model.grid_size", "model.in_chans", "model.projector_hidden_dim",
                "model.projector_layers", "model.decoder_dim", "model.decoder_depth", "model.decoder_num_heads",
                "collapse_guard.patience", "synthetic_batches"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"Config key {key!r} must be positive, got {OmegaConf.select(cfg, key)!r}.")
    try:
        check_data_config(cfg.data, extra_loaders=_TRAINER_LOADERS)
    except DataConfigError as err:
        raise ConfigError(str(err)) from None
    for key in ("model.embed_dim", "model.depth", "model.num_heads"):  # null: the value of model.arch
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"Config key {key!r} must be positive or null (model.arch's own value), "
                              f"got {OmegaConf.select(cfg, key)!r}.")
    ratio = cfg.model.decoder_mlp_ratio
    if not math.isfinite(ratio) or int(cfg.model.decoder_dim * ratio) < 1:  # the MLP's width is int(dim * ratio)
        raise ConfigError(f"Config key 'model.decoder_mlp_ratio' must be a positive number (the decoder MLP is "
                          f"model.decoder_dim x ratio wide, at least 1), got {ratio!r}.")
    if cfg.data.loader == "synthetic":  # make_loader gives synthetic noise for every URL, eval splits included
        for key in ("data.eval_url", "eval.knn_train_url"):
            if OmegaConf.select(cfg, key):
                raise ConfigError(f"Config key {key!r} is set ({OmegaConf.select(cfg, key)}) but data.loader=synthetic "
                                  "never reads it (k-NN would score unlabelled synthetic noise): set "
                                  f"{key}=null, or use data.loader=dali or torch.")
    if cfg.model.in_chans != 3 and cfg.data.loader not in _TRAINER_LOADERS:
        raise ConfigError(f"Config key 'model.in_chans' is {cfg.model.in_chans}, but the data.loader="
                          f"{cfg.data.loader} pipeline always gives RGB images (3 channels): use model.in_chans=3 "
                          "(grey images are read as RGB), or data.loader=synthetic.")
    if cfg.threads is not None and cfg.threads <= 0:
        raise ConfigError(f"Config key 'threads' must be positive or null (the thread budget), got {cfg.threads!r}.")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise ConfigError(f"Config key 'max_steps' must be positive or null, got {cfg.max_steps!r}.")
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError("Config key 'checkpoint.every_steps' must be 0 (only at the end) or positive.")
    for key in ("optim.base_lr", "optim.weight_decay", "optim.clip_grad", "optim.warmup_epochs", "optim.eps",
                "optim.warmup_start_factor", "optim.final_factor", "model.drop_path_rate", "model.sim_reg_coef",
                "eval.knn_every_epochs", "collapse_guard.after_epochs"):
        v = OmegaConf.select(cfg, key)
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"Config key {key!r} must be a finite non-negative number, got {v!r}.")
    if cfg.optim.lr is not None and (not math.isfinite(cfg.optim.lr) or cfg.optim.lr < 0):
        raise ConfigError(f"Config key 'optim.lr' must be a finite non-negative number or null (base_lr scaling), got {cfg.optim.lr!r}.")
    for key in ("ema.start", "ema.end"):
        value = OmegaConf.select(cfg, key)
        if not 0 <= value <= 1:
            raise ConfigError(f"Config key {key!r} must be between 0 and 1, got {value!r}.")
    betas = tuple(cfg.optim.betas)
    if not all(0 <= b < 1 for b in betas):  # AdamW's bias correction divides by 1 - beta**step
        raise ConfigError(f"Config key 'optim.betas' must hold two numbers in [0, 1) (AdamW refuses 1), "
                          f"got {list(betas)!r}.")
    if not 0 <= cfg.model.drop_path_rate < 1:  # a rate of 1 drops every residual branch
        raise ConfigError(f"Config key 'model.drop_path_rate' must be in [0, 1), got {cfg.model.drop_path_rate!r}.")
    for key in ("model.tau", "eval.knn_t"):
        if not (OmegaConf.select(cfg, key) > 0 and math.isfinite(OmegaConf.select(cfg, key))):
            raise ConfigError(f"Config key {key!r} must be a positive temperature, got {OmegaConf.select(cfg, key)!r}.")
    if cfg.collapse_guard.metric not in COLLAPSE_METRICS:
        raise ConfigError(f"Config key 'collapse_guard.metric' must be one of {', '.join(COLLAPSE_METRICS)} "
                          f"(the diagnostics the trainer logs), got {cfg.collapse_guard.metric!r}.")
    for dim, heads in (("model.embed_dim", "model.num_heads"), ("model.decoder_dim", "model.decoder_num_heads")):
        d, h = OmegaConf.select(cfg, dim), OmegaConf.select(cfg, heads)
        if d is not None and h is not None and (d <= 0 or h <= 0 or d % h):
            raise ConfigError(f"Config key {dim!r} ({d}) must be a positive multiple of {heads!r} ({h}).")
    if cfg.model.patch_gap == 1 or cfg.model.patch_gap < 0:
        raise ConfigError(
            f"Config key 'model.patch_gap' is {cfg.model.patch_gap}: a gap of 1 cannot jitter (offsets are drawn in "
            "0..gap-1, so it only drops a row and a column of every cell); use 0 for no gap or 2 or more."
        )
    # Every mask strategy gives exactly num_visible visible patches and the rest as targets. The
    # InfoNCE loss standardises the predictions over the targets (an unbiased std divides by T - 1) and
    # contrasts each target with the others, so T >= 2; with one it is NaN, reported as divergence.
    n = cfg.model.grid_size ** 2
    if n < 3:
        raise ConfigError(f"Config key 'model.grid_size' must be at least 2 (a training image needs at least 1 "
                          f"visible and 2 target patches), got {cfg.model.grid_size}.")
    if not 0 < cfg.data.num_visible <= n - 2:
        raise ConfigError(
            f"Config key 'data.num_visible' must be between 1 and {n - 2} for a {cfg.model.grid_size}x"
            f"{cfg.model.grid_size} grid (at least 2 patches must be targets: the loss contrasts each target with "
            f"the others), got {cfg.data.num_visible}."
        )
    # s(x) of one visible token is its cosine with itself, 1 whatever the weights: the visible half of
    # the regulariser would push nothing but stay a constant penalty (model/losses.py).
    if cfg.model.sim_reg_coef > 0 and cfg.model.objective != "mae" and cfg.data.num_visible < 2:
        raise ConfigError(
            f"Config key 'data.num_visible' must be at least 2 when model.sim_reg_coef > 0 (the similarity "
            f"regulariser compares the visible tokens with each other; one token only matches itself), "
            f"got {cfg.data.num_visible}; raise it or set model.sim_reg_coef=0."
        )
    from lmim.model.encoder import arch_problem  # imports timm: only once the cheaper checks passed

    problem = arch_problem(str(cfg.model.arch))
    if problem:
        raise ConfigError(f"Config key 'model.arch' must be the name of a timm ViT (timm's vision_transformer "
                          f"module, e.g. vit_base_patch16_224), got {cfg.model.arch!r}: {problem}.")
    for name in cfg.log_with:
        if name not in ("tensorboard", "wandb"):
            raise ConfigError(f"Config key 'log_with' may hold 'tensorboard' and 'wandb', got {name!r}.")


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Build the resolved training config.

    Args:
        config: a preset name (`preset_names()`) or a YAML path; None = defaults only.
        overrides: `key=value` items (OmegaConf dotlist syntax; lists as `[a,b]`).

    Returns:
        A typed DictConfig with the TrainConfig schema (assigning an unknown key or a wrong
        type to it later still fails).

    Raises:
        ConfigError: one sentence saying what is wrong and what to do.
    """
    schema = OmegaConf.structured(TrainConfig)
    cfg = _merge(schema, _load_yaml(_config_dir() / "defaults.yaml"), schema, "in train/configs/defaults.yaml")
    if config is not None:
        path = preset_path(config)
        cfg = _merge(cfg, _drop_removed_keys(_load_yaml(path), f"in {path.name}"), schema, f"in {path.name}")
    for item in overrides:
        source = f"from the override {item!r}"
        cfg = _merge(cfg, _drop_removed_keys(_parse_override(item, schema), source), schema, source, item.split("=", 1)[0])
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / cfg.name)
    _check_values(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config (written to a temp file then renamed, so never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(to_yaml(cfg))
        tmp.replace(path)
    except OSError as err:  # e.g. a full disk: no half-written temp file left, and the error names `path`
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    return path


def effective_batch_size(cfg: DictConfig, num_processes: int) -> int:
    """Images per optimizer step over all processes: per-process batch x processes x grad-accum."""
    return int(cfg.data.batch_size) * int(num_processes) * int(cfg.grad_accum)
