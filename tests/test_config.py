"""train/config.py: presets, overrides, and one-sentence errors at start-up."""
from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lmim.train.config import ConfigError, TrainConfig, load_config, preset_names, save_config


def _one_sentence(msg: str) -> None:
    assert "\n" not in msg, msg
    assert msg.rstrip().endswith((".", "?")), msg
    assert "object_type" not in msg and "full_key" not in msg, msg


def test_defaults_file_equals_schema_defaults():
    """defaults.yaml writes every default out in full; it must not drift from the dataclasses."""
    from importlib import resources

    import json

    schema = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(TrainConfig))))  # tuples -> lists
    text = (resources.files("lmim.train") / "configs" / "defaults.yaml").read_text()
    from_file = OmegaConf.to_container(OmegaConf.create(text))
    # train's own sections must match key for key; model/data (owned by their packages) may gain fields.
    for key, value in schema.items():
        if key in ("model", "data"):
            for k, v in from_file[key].items():
                assert schema[key][k] == v, f"defaults.yaml {key}.{k}"
        else:
            assert from_file[key] == value, f"defaults.yaml {key}"


def test_presets_load_and_reference_recipe():
    assert {"defaults", "quickstart", "vit_b16_in1k", "vit_s16_in1k", "vit_l16_in1k"} <= set(preset_names())
    for name in preset_names():
        load_config(name)
    b = load_config("vit_b16_in1k", ["grad_accum=2"])
    assert b.model.arch == "vit_base_patch16_224" and b.model.grid_size == 14 and b.model.patch_gap == 4
    assert b.data.num_visible == 20 and b.epochs == 800 and b.optim.warmup_epochs == 40
    assert tuple(b.optim.betas) == (0.9, 0.95) and b.optim.weight_decay == 0.05 and b.optim.clip_grad == 0
    assert b.model.sim_reg_coef == 0.1 and b.ema.start == 0.99 and b.ema.end == 1.0
    assert b.run_dir == "runs/vit_b16_in1k"


def test_overrides_types_and_file_path(tmp_path):
    cfg = load_config("quickstart", ["optim.base_lr=3e-4", "data.crop_scale=[0.3,1.0]", "max_steps=7", "log_with=[]"])
    assert cfg.optim.base_lr == 3e-4 and list(cfg.data.crop_scale) == [0.3, 1.0] and cfg.max_steps == 7
    assert list(cfg.log_with) == []
    path = save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(path))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lrr=1"], "Unknown config key 'optim.lrr'"),
        (["optim.lrr=1"], "did you mean 'optim.lr'"),
        (["nonsense=1"], "Unknown config key 'nonsense'"),
        (["epochs=ten"], "'epochs' must be an integer, got 'ten'"),
        (["data.batch_size=1.5"], "'data.batch_size' must be an integer"),
        (["progress=maybe"], "'progress' must be true or false"),
        (["precision=fp8"], "'precision' must be one of auto, bf16, fp16, no"),
        (["epochs"], "is not of the form key=value"),
        (["model.embed_dim=["], "its value is not valid YAML"),
        (["data.num_visible=64"], "'data.num_visible' must be between 1 and 62 for a 8x8 grid (at least 2 patches"),
        (["data.num_visible=63"], "'data.num_visible' must be between 1 and 62"),
        (["data.num_visible=63", "data.mask=multiblock"], "'data.num_visible' must be between 1 and 62"),
        (["model.grid_size=2", "data.num_visible=3"], "must be between 1 and 2 for a 2x2 grid"),
        (["model.grid_size=1", "data.num_visible=1"], "'model.grid_size' must be at least 2"),
        (["model.sim_reg_coef=0.1", "data.num_visible=1"], "'data.num_visible' must be at least 2 when model.sim_reg_coef > 0"),
        (["grad_accum=0"], "'grad_accum' must be positive"),
        (["name=../../escaped"], "'name' must be a plain name (no '/' or '\\', not '.' or '..'), got '../../escaped'"),
        (["name=.."], "'name' must be a plain name"),
        (["name=a\\b"], "'name' must be a plain name"),
        (["name=''"], "'name' must be a plain name"),
        (["model.patch_gap=1"], "a gap of 1 cannot jitter"),
        (["model.patch_gap=-2"], "use 0 for no gap or 2 or more"),
        (["model.init=kaiming"], "'model.init' must be one of reference, timm"),
        (["data.crop_scale=[0.1,0.2,0.3]"], "'data.crop_scale' has an invalid value (from the override 'data.crop_scale=[0.1,0.2,0.3]'): it takes 2 items, got 3"),
        (["data.crop_scale=[0.1,x]"], "'data.crop_scale' has an invalid value"),
        (["optim.betas=3"], "'optim.betas' must be a list, written [a, b], got 3"),
        (["data.sources=dsA"], "'data.sources' must be a list, written [a, b], got 'dsA'"),
        (["data.sources=[{url: a, weight: x}]"], "'data.sources[...].weight' must be a number, got 'x'"),
        (["data.sources=[{url: a}, {wieght: 1}]"], "Unknown config key 'data.sources[...].wieght'"),
        # data.* choices and ranges fail at load time, before any data or model is touched
        (["data.reader=s3"], "'data.reader' must be one of auto, dali, stream, got 's3'"),
        (["data.on_error=ignore"], "'data.on_error' must be one of skip, raise"),
        (["data.loader=pil"], "'data.loader' must be one of dali, torch, synthetic"),
        (["data.mask=grid"], "'data.mask' must be one of random, block, multiblock"),
        (["data.crop_scale=[0.5,0.2]"], "'data.crop_scale' must be a range [lo, hi] with 0 < lo <= hi <= 1"),
        (["data.hflip=2"], "'data.hflip' must be a probability between 0 and 1"),
        (["data.prefetch_shards=0"], "'data.prefetch_shards' must be at least 1"),
        (["data.block_min_scale=0.5", "data.block_max_scale=0.2"], "'data.block_min_scale' must be in (0, data.block_max_scale=0.2]"),
        (["model.embed_dim=30", "model.num_heads=4"], "'model.embed_dim' (30) must be a positive multiple of 'model.num_heads' (4)"),
        (["model.decoder_num_heads=5"], "'model.decoder_dim'"),
        (["collapse_guard.metric=loss"], "'collapse_guard.metric' must be one of collapse_cos"),
        (["ema.end=1.01"], "'ema.end' must be between 0 and 1"),
        (["optim.betas=[1,1]"], "'optim.betas' must hold two numbers in [0, 1) (AdamW refuses 1), got [1.0, 1.0]"),
        (["optim.betas=[0.9,-0.1]"], "'optim.betas' must hold two numbers in [0, 1)"),
        (["model.drop_path_rate=1.5"], "'model.drop_path_rate' must be in [0, 1), got 1.5"),
        (["model.drop_path_rate=1"], "'model.drop_path_rate' must be in [0, 1)"),
        (["model.tau=0"], "'model.tau' must be a positive temperature"),
        (["model.arch=vit_nope"], "'model.arch' must be the name of a timm ViT (timm's vision_transformer module"),
        (["model.arch=vit_tiny_patch16_22"], "did you mean 'vit_tiny_patch16_224'?"),
        (["model.arch=resnet50"], "got 'resnet50': it is a timm model but not a VisionTransformer"),
        (["model.in_chans=1", "data.loader=torch"], "pipeline always gives RGB images (3 channels): use model.in_chans=3"),
        (["model.in_chans=4"], "'model.in_chans' is 4, but the data.loader=dali pipeline"),
        (["model.tau=inf"], "'model.tau' must be a positive temperature"),
        (["model.depth=0"], "'model.depth' must be positive or null (model.arch's own value), got 0"),
        (["model.embed_dim=-96"], "'model.embed_dim' must be positive or null"),
        (["model.num_heads=0"], "'model.num_heads' must be positive or null"),
        (["model.decoder_mlp_ratio=-1"], "'model.decoder_mlp_ratio' must be a positive number"),
        (["model.decoder_mlp_ratio=0"], "'model.decoder_mlp_ratio' must be a positive number"),
        (["model.decoder_mlp_ratio=0.001"], "model.decoder_dim x ratio wide, at least 1"),
        (["model.decoder_mlp_ratio=nan"], "'model.decoder_mlp_ratio' must be a positive number"),
        (["eval.knn_k=0"], "'eval.knn_k' must be positive"),
        (["synthetic_batches=0"], "'synthetic_batches' must be positive"),
        (["data.loader=synthetic", "data.eval_url=/data/val"], "'data.eval_url' is set (/data/val) but data.loader=synthetic never reads it"),
        (["data.loader=synthetic", "eval.knn_train_url=/data/train"], "'eval.knn_train_url' is set (/data/train) but data.loader=synthetic"),
        (["data.reader=dali", "data.url=s3://bucket/train"], "'data.reader' is 'dali', which reads local shards only"),
    ],
)
def test_bad_values_give_one_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", overrides)
    msg = str(info.value)
    assert fragment in msg
    _one_sentence(msg)


def test_every_shipped_preset_loads_and_validates():
    for name in preset_names():
        load_config(name)


def test_a_removed_key_in_an_old_config_is_named_and_ignored(tmp_path, caplog):
    """data.shuffle_buffer was never read; an old config that sets it still runs, and is told to drop it."""
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  shuffle_buffer: 4096\n  batch_size: 8\n")
    with caplog.at_level("WARNING", logger="lmim.config"):
        cfg = load_config(str(old), ["data.shuffle_buffer=16"])
    assert cfg.data.batch_size == 8 and "shuffle_buffer" not in cfg.data
    warnings = [r.getMessage() for r in caplog.records if "shuffle_buffer" in r.getMessage()]
    assert len(warnings) == 2 and all("no longer used and was ignored" in w and "delete it" in w for w in warnings)
    assert "in old.yaml" in warnings[0] and "override" in warnings[1]


def test_bad_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset; choose one of"):
        load_config("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert "Unknown config key 'optim.warmup_epoch' (in bad.yaml); did you mean 'optim.warmup_epochs'?" == str(info.value)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(bad))


def test_cli_exits_nonzero_with_one_line(tmp_path):
    """`lmim pretrain` with a wrong type: exit 2, one line on stderr, nothing written."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", "epochs=abc", f"run_dir={run_dir}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["lmim pretrain: Config key 'epochs' must be an integer, got 'abc' (from the override 'epochs=abc')."]
    assert not run_dir.exists()


def test_print_config_resolves_run_dir():
    proc = subprocess.run(
        [sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", "--print-config", "seed=5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.seed == 5 and cfg.run_dir == "runs/quickstart"


def test_options_and_overrides_mix_in_any_order_on_the_command_line():
    from lmim.train.pretrain import parse_args

    args = parse_args(["epochs=3", "--config", "quickstart", "log_every=5", "--resume", "auto"])
    assert args.config == "quickstart" and args.resume == "auto" and args.overrides == ["epochs=3", "log_every=5"]


def test_a_cache_dir_that_cannot_be_a_folder_is_refused_at_start(tmp_path):
    """The cache folder is created only when the first shard is cached, deep in a run: a path that
    is a file, or lies under one, is a config error before anything starts."""
    from lmim.pipeline.config import DataConfigError

    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, needle in ((afile, "is a file"), (afile / "sub", "lies under the file")):
        with pytest.raises((ConfigError, DataConfigError), match=needle):
            load_config("quickstart", ["data.reader=stream", f"data.cache_dir={path}"])
    load_config("quickstart", ["data.reader=stream", f"data.cache_dir={tmp_path / 'new' / 'cache'}"])  # fine


@pytest.mark.parametrize("override, key", [("run_dir=s3://bucket/runs/x", "'run_dir'"),
                                           ("data.cache_dir=s3://bucket/cache", "'data.cache_dir'")])
def test_a_url_where_a_local_folder_is_needed_is_refused_at_load_time(override, key, tmp_path, monkeypatch):
    """Path("s3://b/r") is the local folder s3:/b/r: a run or cache "on s3://" used to land on local disk."""
    from lmim.pipeline.config import DataConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises((ConfigError, DataConfigError), match=f"{key} is a URL"):
        load_config("quickstart", [override])
    assert list(tmp_path.iterdir()) == []
