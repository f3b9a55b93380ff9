"""Export round trip: checkpoint dir -> .safetensors -> timm.create_model(pretrained=True, file=...)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import timm
from lmim.model import LatentMIM, ModelConfig
from lmim.model.encoder import encode_patches
from lmim.tools import export


def _tiny() -> ModelConfig:
    return ModelConfig(arch="vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, patch_size=4, grid_size=4,
                       patch_gap=2, projector_hidden_dim=96, decoder_dim=32, decoder_depth=1, decoder_num_heads=4)


def _write_checkpoint(path, net: LatentMIM) -> None:
    """The trainer's checkpoint contract: model.safetensors (state_dict) + config.yaml (full config)."""
    path.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
    config = {"model": dataclasses.asdict(net.cfg), "optim": {"base_lr": 1.5e-4}, "epochs": 1}
    (path / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    net = LatentMIM(_tiny())
    with torch.no_grad():  # "training": move every weight away from its init
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt = tmp_path / "ckpt"
    _write_checkpoint(ckpt, net)
    return net, ckpt


def test_round_trip_through_timm(trained, tmp_path, capsys):
    net, ckpt = trained
    out = tmp_path / "enc.safetensors"
    assert export.main([str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch16_224', pretrained=True" in printed

    model = eval(export.timm_command(out), {"timm": timm})   # the line lmim prints, as a user runs it
    assert isinstance(model, timm.models.VisionTransformer)
    # Strict keys: the file holds exactly the timm model's state dict, every tensor loaded.
    sd = load_file(str(out))
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, net.encoder.state_dict()[k]), k

    # Same features as the trained encoder at evaluation (img = grid * patch, no gap).
    model.eval()
    net.eval()
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = encode_patches(net.encoder, net.patchify(img), None)
        theirs = model.forward_features(img)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # The printed command is runnable as is.
    line = next(ln.strip() for ln in printed.splitlines() if "timm.create_model(" in ln)
    rebuilt = eval(line.split("=", 1)[1].strip(), {"timm": timm})
    assert torch.allclose(rebuilt.eval().forward_features(img), theirs)


def test_load_encoder_from_file_and_dir(trained, tmp_path):
    net, ckpt = trained
    out = tmp_path / "enc.safetensors"
    export.export_encoder(ckpt, out)
    img = torch.randn(1, 3, 16, 16)
    a = export.load_encoder(out)(img)
    b = export.load_encoder(ckpt)(img)
    assert a.shape == (1, 64) and torch.allclose(a, b, atol=1e-5)
    full = export.load_latent_mim(ckpt)
    for k, v in full.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    assert export.encoder_kwargs(net.cfg) == export.read_export_metadata(out)[1]


def test_export_target_encoder(trained, tmp_path):
    net, ckpt = trained
    out = tmp_path / "tgt.safetensors"
    assert export.main([str(ckpt), str(out), "--encoder", "target"]) == 0
    sd = load_file(str(out))
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], net.target_encoder.blocks[0].attn.qkv.weight)


def test_bad_input_is_one_clear_error(trained, tmp_path, capsys):
    _, ckpt = trained
    assert export.main([str(tmp_path / "nope"), str(tmp_path / "x.safetensors")]) == 2
    assert "nope does not exist: pass a checkpoint directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main([str(empty), str(tmp_path / "x.safetensors")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    run_dir = tmp_path / "run"   # a run folder, given where one of its checkpoints was meant
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text((ckpt / "config.yaml").read_text())
    assert export.main([str(run_dir), str(tmp_path / "x.safetensors")]) == 2
    assert "run is a run folder, not a checkpoint: pass one of its checkpoints" in capsys.readouterr().err
    assert export.main([str(run_dir / "checkpoints"), str(tmp_path / "x.safetensors")]) == 2   # one level short
    assert "checkpoints is a run's checkpoints folder, not a checkpoint" in capsys.readouterr().err
    assert export.main([str(ckpt), str(tmp_path / "X.SAFETENSORS")]) == 2     # a file name, not a folder
    assert "must end in .safetensors" in capsys.readouterr().err
    assert export.main([str(ckpt), str(tmp_path / "x.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert not list(tmp_path.glob("*x*"))  # nothing half-written
    (ckpt / "model.safetensors").unlink()
    assert export.main([str(ckpt), str(tmp_path / "x.safetensors")]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_folder_export_loads_with_one_timm_line_and_carries_a_model_card(trained, tmp_path, capsys):
    """`lmim export CKPT DIR`: config.json + model.safetensors + README.md, loaded by timm's local-dir source."""
    net, ckpt = trained
    (ckpt / "trainer_state.json").write_text('{"step": 120, "epoch": 3.0}')
    out = tmp_path / "exports" / "tiny-lmim"
    assert export.main([str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(export.FOLDER_FILES)
    assert f"timm.create_model('local-dir:{out}', pretrained=True)" in printed

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert isinstance(model, timm.models.VisionTransformer) and model.num_classes == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, net.encoder.state_dict()[k]), k
    # timm's data config is the one lmim trained and evaluated with, not the arch's default
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_cfg["input_size"]) == (3, 16, 16) and tuple(data_cfg["mean"]) == (0.485, 0.456, 0.406)
    assert data_cfg["interpolation"] == "bicubic"
    saved = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert saved["tag"] == "lmim" and "license" not in saved  # not the facts of timm's own augreg weights

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "| optimizer steps | 120 |" in card and "vit_tiny_patch16_224" in card and "base_lr: 0.00015" in card


def test_folder_export_is_reproducible_replaces_an_old_export_and_refuses_other_folders(trained, tmp_path):
    _, ckpt = trained
    out = tmp_path / "enc"
    export.export_folder(ckpt, out, figures={"k-NN top-1 (20-NN)": 71.25})
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "| k-NN top-1 (20-NN) | 71.25 |" in first["README.md"].decode()
    export.export_folder(ckpt, out, figures={"k-NN top-1 (20-NN)": 71.25})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(export.ExportError, match="is not an lmim export folder"):
        export.export_folder(ckpt, other)
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]
    # A folder with only the export's file names is not an export either: a user's notes, or another
    # tool's timm folder (its config.json without lmim's tag), are kept.
    notes = tmp_path / "myproj"
    notes.mkdir()
    (notes / "README.md").write_text("# my notes\n")
    timm_folder = tmp_path / "their-vit"
    timm_folder.mkdir()
    for name in export.FOLDER_FILES:
        (timm_folder / name).write_bytes(first[name])
    (timm_folder / "config.json").write_text(first["config.json"].decode().replace('"lmim"', '"augreg_in21k"'))
    for kept in (notes, timm_folder):
        before = {p.name: p.read_bytes() for p in kept.iterdir()}
        with pytest.raises(export.ExportError, match="is not an lmim export folder"):
            export.export_folder(ckpt, kept)
        assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_the_current_folder_is_refused_as_an_export_folder(trained, tmp_path, monkeypatch, capsys):
    """`lmim export CK .` in an empty folder: Path('.') has no name to build the temporary folder from
    (a traceback and exit 1); the current folder cannot be swapped out whole anyway."""
    _, ckpt = trained
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", str(here)):
        assert export.main([str(ckpt), out]) == 2
        err = capsys.readouterr().err
        assert "is the current folder" in err and err.count("\n") == 1
    assert not list(here.iterdir())


def test_the_run_s_last_knn_figure_reaches_the_model_card(tmp_path):
    torch.manual_seed(0)
    net = LatentMIM(_tiny())
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.parent.mkdir(parents=True)
    _write_checkpoint(ckpt, net)
    (ckpt / "complete.json").write_text('{"step": 10, "files": {}}')   # a run's checkpoint: written whole
    (ckpt / "trainer_state.json").write_text('{"step": 10, "epoch": 1.0}')
    (run / "metrics.jsonl").write_text('{"step": 5, "knn_top1": 40.5}\n{"step": 10, "knn_top1": 42.0}\n'
                                       '{"step": 20, "knn_top1": 50.0}\n{"step": 2')  # later + cut lines ignored
    export.export_folder(ckpt, tmp_path / "out")
    assert "| k-NN top-1 during training (data.eval_url) | 42.00 |" in (tmp_path / "out" / "README.md").read_text()


def test_an_export_never_writes_into_its_own_checkpoint(trained, capsys):
    _, ckpt = trained
    before = (ckpt / "model.safetensors").read_bytes()
    for out in (ckpt / "model.safetensors", ckpt / "sub" / "enc.safetensors", ckpt / "hf-folder"):
        assert export.main([str(ckpt), str(out)]) == 2
        assert "inside the checkpoint folder" in capsys.readouterr().err
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "model.safetensors"]


def test_an_export_to_a_url_is_refused_not_written_to_a_local_folder_named_like_it(trained, tmp_path, capsys,
                                                                                    monkeypatch):
    """Path("s3://b/enc.safetensors") is the local file s3:/b/enc.safetensors: the export used to
    land there and say "wrote s3://...". It is refused, and nothing is written."""
    _, ckpt = trained
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in ("s3://bkt/enc.safetensors", "s3://bkt/enc", "file:///tmp/enc"):
        assert export.main([str(ckpt), out]) == 2
        assert "is a URL" in capsys.readouterr().err
    assert list(here.iterdir()) == []


def test_a_reader_that_goes_away_is_not_reported_as_a_failure(trained, tmp_path):
    """`lmim export CK out | head -1`: the closed pipe is a BrokenPipeError, which is also a
    ConnectionError; it used to be reported as "the data store cannot be reached" (exit 5). The
    command now ends quietly with 141, as a tool killed by SIGPIPE, and the export is written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, ckpt = trained
    out = tmp_path / "enc.safetensors"
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader has gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "lmim.tools.cli", "export", str(ckpt), str(out)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")
    assert load_file(str(out))


def test_damaged_checkpoints_and_exports_are_one_sentence_not_a_traceback(trained, tmp_path, capsys):
    """What a user meets with a checkpoint or an export that was edited, cut or came from elsewhere:
    `lmim export` / `load_encoder` name the file and what to do (ExportError, exit 2)."""
    net, ckpt = trained
    # config.yaml that is not YAML
    bad_yaml = tmp_path / "bad_yaml"
    _write_checkpoint(bad_yaml, net)
    (bad_yaml / "config.yaml").write_text("model: [unclosed\n")
    assert export.main([str(bad_yaml), str(tmp_path / "a.safetensors")]) == 2
    assert "not a readable YAML file" in capsys.readouterr().err
    # weights of another shape than the config says
    grown = tmp_path / "grown"
    _write_checkpoint(grown, net)
    cfg = yaml.safe_load((grown / "config.yaml").read_text())
    cfg["model"]["embed_dim"] = 32
    (grown / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert export.main([str(grown), str(tmp_path / "b.safetensors")]) == 2
    assert "does not match the model described by its config.yaml" in capsys.readouterr().err
    # an output that is an existing folder
    (tmp_path / "dir.safetensors").mkdir()
    assert export.main([str(ckpt), str(tmp_path / "dir.safetensors")]) == 2
    assert "existing folder" in capsys.readouterr().err
    # exports that are not safetensors, or whose metadata cannot build a timm model
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(export.ExportError, match="not a readable safetensors file"):
        export.load_encoder(garbage)
    good = tmp_path / "good.safetensors"
    assert export.main([str(ckpt), str(good)]) == 0
    tensors = load_file(str(good))
    for meta, message in [({export.META_ARCH: "no_such_model", export.META_KWARGS: "{}"}, "cannot be loaded as a timm"),
                          ({export.META_ARCH: "vit_tiny_patch16_224", export.META_KWARGS: "[1]"}, "not a JSON object"),
                          ({export.META_ARCH: "vit_tiny_patch16_224", export.META_KWARGS: "{bad"}, "not a JSON object")]:
        edited = tmp_path / "edited.safetensors"
        save_file(tensors, str(edited), metadata={**meta, "format": "pt"})
        with pytest.raises(export.ExportError, match=message):
            export.load_encoder(edited)


def test_an_unwritable_export_path_is_one_sentence_and_exit_6(trained, capsys):
    """A path nobody can create files under, root included (/proc): one sentence naming the output."""
    from lmim.tools.cli import main

    _, ckpt = trained
    out = "/proc/lmim-export-test.safetensors"
    assert main(["export", str(ckpt), out]) == 6
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and out in err and "Traceback" not in err


def test_exports_and_checkpoints_are_as_readable_as_any_file_the_user_writes(trained, tmp_path):
    """safetensors writes through a private 0600 file; the results follow the umask like other files."""
    import os
    import stat

    from tests.test_train import _run

    old = os.umask(0o022)
    try:
        _, ckpt = trained
        assert export.main([str(ckpt), str(tmp_path / "enc.safetensors")]) == 0
        assert export.main([str(ckpt), str(tmp_path / "folder")]) == 0
        run = _run(tmp_path / "run", "max_steps=1")
        files = [tmp_path / "enc.safetensors", tmp_path / "folder" / "model.safetensors",
                 *[p for p in (tmp_path / "run" / "checkpoints").glob("step_*/*") if p.is_file()]]
        assert run["step"] == 1 and len(files) > 4
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
            {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    finally:
        os.umask(old)


def test_the_model_card_names_a_mixture_s_sources_and_the_updates_taken(tmp_path):
    """A `data.sources` run's card said the unused `data.url` default; after a resume that renumbered
    the steps it quoted the step counter, not the optimizer updates taken."""
    from omegaconf import OmegaConf

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000120"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 120, "updates": 113, "epoch": 2.0}')
    cfg = OmegaConf.create({"name": "mix", "epochs": 2, "model": {"arch": "vit_tiny_patch16_224"},
                            "data": {"url": "data/quickstart", "sources": [
                                {"url": "s3://b/photos", "weight": 3.0, "name": "photos"},
                                {"url": "/data/digits", "weight": 1.0, "name": "digits"}]}})
    card = export.model_card(ckpt, cfg, {}, "online", tmp_path / "enc")
    assert "| data | `s3://b/photos` (weight 3.0), `/data/digits` (weight 1.0) |" in card
    assert "data/quickstart`" not in card.split("## Training config")[0]
    assert "| optimizer steps | 113 |" in card


def test_a_checkpoint_whose_write_was_stopped_is_not_exported(trained, tmp_path, capsys):
    """A `.tmp-step_N` folder (the trainer killed mid-write) or a run's step_N without complete.json (a
    partial copy) was exported silently; a folder made by hand (no run around it) is read as it is."""
    _, ckpt = trained
    in_progress = tmp_path / "run" / "checkpoints" / ".tmp-step_00000006"
    in_progress.parent.mkdir(parents=True)
    shutil.copytree(ckpt, in_progress)
    partial = in_progress.with_name("step_00000006")
    shutil.copytree(ckpt, partial)
    for folder, said in ((in_progress, "still writing"), (partial, "has no complete.json")):
        assert export.main([str(folder), str(tmp_path / "p.safetensors")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()
    assert export.main([str(ckpt), str(tmp_path / "p.safetensors")]) == 0   # made by hand: no record to check


def test_the_printed_loading_line_works_from_any_folder(trained, tmp_path, monkeypatch, capsys):
    """A relative OUT was printed as given, so the line failed when pasted in another folder."""
    _, ckpt = trained
    monkeypatch.chdir(tmp_path)
    assert export.main([str(ckpt), "enc.safetensors"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"file='{tmp_path / 'enc.safetensors'}'" in line
    monkeypatch.chdir("/")
    exec(line.strip(), {})


@pytest.mark.parametrize("exchange", [True, False])
def test_an_export_folder_is_replaced_in_one_step_or_by_two_renames(trained, tmp_path, monkeypatch, exchange):
    """Re-exporting swaps the new folder in with renameat2(RENAME_EXCHANGE) where Linux has it (a kill
    between two renames left no export at all); elsewhere two renames. Either way: the new export,
    and nothing left beside it."""
    _, ckpt = trained
    out = tmp_path / "enc"
    export.export_folder(ckpt, out, figures={"k-NN": 1.0})
    if not exchange:
        monkeypatch.setattr(export, "_exchange", lambda a, b: False)
    else:
        swapped = []
        real = export._exchange
        monkeypatch.setattr(export, "_exchange", lambda a, b: swapped.append(real(a, b)) or swapped[-1])
    export.export_folder(ckpt, out, figures={"k-NN": 2.0})
    assert "| k-NN | 2.00 |" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "enc"]
    if exchange:
        assert len(swapped) == 1     # tried once (True where glibc >= 2.28 and the file system allow it)
