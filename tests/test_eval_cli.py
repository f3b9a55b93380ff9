"""Feature extraction through the real pipeline + a tiny timm ViT, and `lmim eval` end to end."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lmim.model import LatentMIM, ModelConfig
from lmim.pipeline.config import DataConfig
from lmim.tools.datasets import DIGITS_CLASSES, export_digits
from lmim.tools import eval_cli as cli
from lmim.train.evaluate.features import eval_loader, extract, extract_features
from lmim.train.evaluate.knn import knn_loo1, knn_weighted
from lmim.train.evaluate.linear import linear_probe


def tiny_cfg() -> ModelConfig:
    # 32 px digits, patch 4 -> an 8 x 8 grid.
    return ModelConfig(arch="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, patch_size=4, grid_size=8,
                       patch_gap=0, projector_hidden_dim=48, projector_layers=2, decoder_dim=32, decoder_depth=1,
                       decoder_num_heads=2)


def shard_tree(src: Path, dst: Path) -> str:
    """Class-folder tree -> lmim shards, through the project's shard builder."""
    try:
        from lmim.tools.shard import build_dataset
    except ImportError:
        pytest.skip("the shard builder (lmim.tools.shard.build_dataset) is not available yet")
    build_dataset(str(src), str(dst), shard_max_samples=16, workers=1, progress=False)
    return str(dst)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evaldigits")
    out = {}
    for split, per_class in (("train", 6), ("test", 4)):
        src = export_digits(root / f"{split}-src", split, per_class=per_class, seed=0)
        out[split] = shard_tree(src, root / split)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory in the trainer's format (model.safetensors + config.yaml)."""
    torch.manual_seed(0)
    net = LatentMIM(tiny_cfg())
    path = tmp_path_factory.mktemp("evalckpt") / "ckpt"
    path.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
    cfg = {"model": dataclasses.asdict(net.cfg), "data": {"batch_size": 8}}
    cfg["data"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(DataConfig(batch_size=8)).items()}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def encoder_of(checkpoint: Path):
    from lmim.tools.export import load_encoder

    return load_encoder(checkpoint)


def test_extract_features_labels_follow_keys_and_batching(digits, checkpoint):
    enc = encoder_of(checkpoint)
    a = extract(enc, eval_loader(enc, digits["test"], batch_size=7, loader="dali"), pools=("mean_patch", "cls"),
                token_sim=True)
    n = 40
    assert a["mean_patch"].shape == (n, 32) and a["cls"].shape == (n, 32) and a["labels"].shape == (n,)
    assert a["mean_patch"].dtype == torch.float32 and a["labels"].dtype == torch.int64
    assert a["keys"] == sorted(a["keys"]) and len(set(a["keys"])) == n
    # The shard builder keeps the class folder in each key: the label must be that class.
    for key, label in zip(a["keys"], a["labels"].tolist()):
        assert DIGITS_CLASSES[label] in key, (key, label)
    assert a["labels"].bincount().tolist() == [4] * 10
    assert ((a["token_sim"] > -1) & (a["token_sim"] <= 1)).all()
    # Another batch size gives the same rows for the same keys (no cross-batch mixing).
    feats, labels = extract_features(enc, eval_loader(enc, digits["test"], batch_size=16, loader="dali"))
    assert torch.equal(labels, a["labels"])
    torch.testing.assert_close(feats, a["mean_patch"], rtol=1e-4, atol=1e-5)
    # Mean of patch tokens, CLS excluded: the encoder's own forward_features on the same images.
    batch = next(iter(eval_loader(enc, digits["test"], batch_size=5, loader="dali")))
    with torch.no_grad():
        tokens = enc.forward_features(batch.images)
    first = [a["keys"].index(k) for k in batch.keys]
    torch.testing.assert_close(a["mean_patch"][first], tokens[:, 1:].mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["cls"][first], tokens[:, 0], rtol=1e-4, atol=1e-5)


def test_extract_deduplicates_repeated_keys():
    enc = torch.nn.Module()
    import timm

    enc = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                            num_classes=0)
    from lmim.pipeline.batch import Batch

    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(5, 3, 8, 8, generator=g)
    empty = torch.zeros(5, 0, dtype=torch.long)
    b1 = Batch(imgs[:3], empty[:3], empty[:3], torch.tensor([0, 1, 2]), ["c", "a", "b"])
    b2 = Batch(imgs[2:], empty[2:], empty[2:], torch.tensor([2, 3, 4]), ["b", "d", "e"])   # "b" repeated
    out = extract(enc, [b1, b2])
    assert out["keys"] == ["a", "b", "c", "d", "e"]
    assert out["labels"].tolist() == [1, 2, 0, 3, 4]


def test_cli_knn_linear_collapse(digits, checkpoint, tmp_path, capsys):
    code = cli.main(["knn", "--encoder", str(checkpoint), "--train-url", digits["train"], "--eval-url",
                     digits["test"], "--json", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "k-NN (leave-one-out 1-NN, cosine, eval split)" in out and "weighted 20-NN" in out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n_eval"] == 40 and res["n_train"] == 60
    # The CLI reports exactly the library's numbers on the pipeline's features.
    enc = encoder_of(checkpoint)
    tr, _ = extract_features(enc, eval_loader(enc, digits["train"], batch_size=16))
    ev, ev_y = extract_features(enc, eval_loader(enc, digits["test"], batch_size=16))
    tr_y = extract(enc, eval_loader(enc, digits["train"], batch_size=16))["labels"]
    assert res["knn_loo1"] == pytest.approx(knn_loo1(ev, ev_y))
    assert res["knn20"] == pytest.approx(knn_weighted(tr, tr_y, ev, ev_y, k=20, T=0.07))

    code = cli.main(["linear", "--encoder", str(checkpoint), "--train-url", digits["train"], "--eval-url",
                     digits["test"], "--epochs", "20", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and "linear probe" in out
    expected = linear_probe(tr, tr_y, ev, ev_y, epochs=20, device="cpu")
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["linear"] == pytest.approx(expected)
    # the train split's top-1 too: under-fitting (both low) reads apart from over-fitting (train high)
    assert 0 <= probe["linear_train"] <= 100 and "% on the train split" in out

    # Without --train-url the default protocol is the paper's leave-one-out 1-NN on the eval split alone.
    code = cli.main(["knn", "--encoder", str(checkpoint), "--eval-url", digits["test"], "--json", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "leave-one-out 1-NN" in out and "weighted 20-NN" not in out
    only_loo1 = json.loads(out.strip().splitlines()[-1])
    assert only_loo1["knn_loo1"] == pytest.approx(res["knn_loo1"]) and "knn20" not in only_loo1

    png = tmp_path / "c.png"
    code = cli.main(["collapse", "--encoder", str(checkpoint), "--url", digits["test"], "--plot", str(png), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    stats = json.loads(out.strip().splitlines()[-1])
    assert 0 < stats["collapse_cos"] < 1 and stats["num_images"] == 40 and "token_sim" in stats
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_paths_say_one_sentence(digits, checkpoint, tmp_path, capsys):
    code = cli.main(["knn", "--encoder", str(tmp_path / "nope"), "--eval-url", digits["test"]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1
    code = cli.main(["knn", "--encoder", str(checkpoint), "--eval-url", str(tmp_path / "nodata"), "--protocol", "loo1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "manifest.json" in err and len(err.splitlines()) == 1
    code = cli.main(["knn", "--encoder", str(checkpoint), "--eval-url", digits["test"], "--protocol", "knn20"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--train-url" in err
    # a file given as the dataset (it was "I/O error ... check that the path can be written", exit 6)
    code = cli.main(["knn", "--encoder", str(checkpoint), "--eval-url", f"{digits['test']}/manifest.json"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is a file, not a dataset: pass the folder that holds manifest.json" in err
    # --plot is checked before any feature is extracted, and names the user's path, not a temporary one
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("x")
    in_a_file = tmp_path / "afile" / "c.png"
    for plot, want_code, want in ((tmp_path / "folder.png", 2, "is a folder"),
                                  (in_a_file, 6, f"cannot write --plot {in_a_file}")):
        code = cli.main(["collapse", "--encoder", str(checkpoint), "--url", digits["test"], "--plot", str(plot)])
        captured = capsys.readouterr()
        assert code == want_code and want in captured.err and ".tmp-" not in captured.err
        assert "features of" not in captured.out + captured.err
    # the check creates no folder: a command that then fails (here: no dataset) leaves none behind
    code = cli.main(["collapse", "--encoder", str(checkpoint), "--url", str(tmp_path / "nodata"),
                     "--plot", str(tmp_path / "new" / "deeper" / "c.png")])
    assert code == 2 and not (tmp_path / "new").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):   # argparse: a usage error (exit 2)
        cli.main(["linear", "--encoder", str(checkpoint), "--train-url", digits["train"], "--eval-url",
                  digits["test"], "--lr", "inf"])
    assert "--lr: must be a positive number, got inf" in capsys.readouterr().err


def test_knn_says_the_k_it_used_and_one_class_splits_are_refused(digits, checkpoint, tmp_path, capsys):
    """A --k larger than the memory bank votes with the whole bank: the line and the JSON say so. A
    split of one class scores 100 % with any encoder: refused before any feature is extracted."""
    code = cli.main(["knn", "--encoder", str(checkpoint), "--train-url", digits["train"], "--eval-url",
                     digits["test"], "--protocol", "knn20", "--k", "500", "--temperature", "0.005", "--json"])
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (res["k"], res["temperature"], res["pool"]) == (60, 0.005, "mean_patch")
    assert "weighted 60-NN" in out and "--k 500 is more than the memory bank holds" in out
    from PIL import Image

    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(one / f"{i}.png")
    url = shard_tree(tmp_path / "one", tmp_path / "one-shards")
    for argv in (["knn", "--encoder", str(checkpoint), "--eval-url", url],
                 ["linear", "--encoder", str(checkpoint), "--train-url", url, "--eval-url", url]):
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert "has one class only ('cat')" in captured.err and "features of" not in captured.out + captured.err


@pytest.mark.slow
def test_two_processes_give_the_single_process_features(digits, checkpoint, tmp_path):
    """torchrun with 2 CPU processes (gloo): each reads half, the gathered result equals one process's."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "import lmim\n"
        "from lmim.tools.export import load_encoder\n"
        "from lmim.train.evaluate.features import eval_loader, extract\n"
        "dist.init_process_group('gloo')\n"
        f"enc = load_encoder({str(checkpoint)!r})\n"
        f"out = extract(enc, eval_loader(enc, {digits['test']!r}, batch_size=6, loader='dali'))\n"
        "if dist.get_rank() == 0:\n"
        "    torch.save({'f': out['mean_patch'], 'y': out['labels'], 'k': out['keys']}, sys.argv[1])\n"
        "dist.destroy_process_group()\n"
    )
    dst = tmp_path / "feats.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                    str(script), str(dst)], check=True, env=env, cwd=Path(__file__).parent.parent, timeout=300)
    got = torch.load(dst)
    enc = encoder_of(checkpoint)
    one = extract(enc, eval_loader(enc, digits["test"], batch_size=6, loader="dali"))
    assert got["k"] == one["keys"]
    assert torch.equal(got["y"], one["labels"])
    torch.testing.assert_close(got["f"], one["mean_patch"], rtol=1e-4, atol=1e-5)
    assert knn_loo1(got["f"], got["y"]) == knn_loo1(one["mean_patch"], one["labels"])


def test_a_split_without_labels_is_refused_before_any_feature_is_extracted(checkpoint, tmp_path, capsys):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(flat / f"{i}.png")
    url = shard_tree(flat, tmp_path / "flat-shards")
    for argv in (["knn", "--encoder", str(checkpoint), "--eval-url", url],
                 ["linear", "--encoder", str(checkpoint), "--train-url", url, "--eval-url", url]):
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert "has no class labels" in captured.err and "features of" not in captured.out + captured.err


def test_splits_with_different_classes_are_refused(digits, checkpoint, tmp_path, capsys):
    from PIL import Image

    other = tmp_path / "other"
    for c in ("cat", "dog"):
        (other / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(other / c / f"{i}.png")
    url = shard_tree(other, tmp_path / "other-shards")
    assert cli.main(["knn", "--encoder", str(checkpoint), "--eval-url", url, "--train-url", digits["train"]]) == 2
    err = capsys.readouterr().err
    # the sentence names what differs (it showed the first 3 names of each side, which could be equal)
    assert "have different classes (only " in err and "only " + url + " has 'cat', 'dog'" in err


def test_a_checkpoint_its_exported_file_and_its_export_folder_score_the_same(digits, tmp_path, capsys):
    """An export records the mean/std its encoder was trained with, and `lmim eval` normalises with
    it: the same weights give the same k-NN figures whether they come as the checkpoint, the
    .safetensors file or the folder (an export used to be evaluated with ImageNet's mean/std)."""
    from lmim.tools.export import export_encoder, export_folder

    torch.manual_seed(1)
    net = LatentMIM(tiny_cfg())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt / "model.safetensors"))
    data = dataclasses.asdict(DataConfig(batch_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    cfg = {"model": dataclasses.asdict(net.cfg), "data": {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    export_encoder(ckpt, tmp_path / "enc.safetensors")
    export_folder(ckpt, tmp_path / "enc-folder")
    figures = []
    for encoder in (ckpt, tmp_path / "enc.safetensors", tmp_path / "enc-folder"):
        code = cli.main(["knn", "--encoder", str(encoder), "--train-url", digits["train"], "--eval-url", digits["test"],
                         "--json", "--batch-size", "16"])
        out = capsys.readouterr().out
        assert code == 0, out
        figures.append(json.loads(out.strip().splitlines()[-1]))
    assert figures[0]["knn20"] == figures[1]["knn20"] == figures[2]["knn20"]
    assert figures[0]["knn_loo1"] == figures[1]["knn_loo1"] == figures[2]["knn_loo1"]
    _, data_cfg = cli.load_encoder_and_data_cfg(str(tmp_path / "enc.safetensors"))
    assert (data_cfg.mean, data_cfg.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    # A recorded std that is not a positive finite number would normalise every image to garbage
    # (NaN scored 25 %): the file is refused in one sentence.
    from safetensors import safe_open

    from lmim.tools.export import META_NORMALISATION

    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    for std in ([float("nan"), 1, 1], [float("inf"), 1, 1], [0, 1, 1]):
        meta[META_NORMALISATION] = json.dumps({"mean": [0.5] * 3, "std": std})
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(cli.EvalError, match="not three finite numbers each"):
            cli.load_encoder_and_data_cfg(str(tmp_path / "bad.safetensors"))


def test_storage_options_on_the_command_line_reach_an_s3_split(digits, checkpoint, s3_server, s3_bucket, monkeypatch,
                                                                capsys):
    """`lmim eval ... --storage-option client_kwargs.endpoint_url=...` reads s3:// splits from that
    endpoint, whatever AWS_ENDPOINT_URL says (here a port where nothing listens)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(digits["test"], f"{s3_bucket}/test", recursive=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    code = cli.main(["knn", "--encoder", str(checkpoint), "--eval-url", f"s3://{s3_bucket}/test", "--json",
                     "--batch-size", "16", "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint_url}"])
    out = capsys.readouterr().out
    assert code == 0, out
    local = cli.main(["knn", "--encoder", str(checkpoint), "--eval-url", digits["test"], "--json", "--batch-size", "16"])
    assert local == 0
    assert json.loads(out.strip().splitlines()[-1])["knn_loo1"] == json.loads(
        capsys.readouterr().out.strip().splitlines()[-1])["knn_loo1"]
