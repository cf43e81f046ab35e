"""Evaluation: the probe maths on constructed features, then `lsdr eval ...` on real shards and a
checkpoint of the real SSLModel (kNN, linear probe, fine-tuning, invariance, rank, W&B, cache)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsdr_repr.backbone import load_trained_backbone
from lsdr_repr.cli import main
from lsdr_repr.errors import DataError
from lsdr_repr.eval import invariance, probes
from lsdr_repr.eval.cache import Evaluator
from lsdr_repr.eval.features import extract_features, load_images01
from lsdr_repr.eval.finetune import count_labelled
from lsdr_repr.eval.invariance import backbone_invariance_table
from lsdr_repr.eval.online import online_knn
from lsdr_repr.eval.report import demo_report, format_report
from tests.terminal import final_bars, run_into_a_log, run_on_a_terminal
from tests.test_export import make_run

NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def separable_features(n: int, seed: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c sits around 4 * e_c (plus noise of std 0.5): separable by a linear map."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, dim, generator=gen) * 0.5
    x[torch.arange(n), y] += 4.0
    return x, y


def test_linear_probe_separable_reaches_100_and_shuffled_labels_stay_at_chance():
    train_x, train_y = separable_features(300, seed=0)
    test_x, test_y = separable_features(200, seed=1)
    res = probes.linear_probe(train_x, train_y, test_x, test_y)
    assert res.top1 == 1.0 and res.top5 == 1.0
    assert set(res.val_top1) == {f"{wd:g}" for wd in probes.DEFAULT_WEIGHT_DECAYS}

    gen = torch.Generator().manual_seed(2)
    shuffled = train_y[torch.randperm(len(train_y), generator=gen)]
    res = probes.linear_probe(train_x, shuffled, test_x, test_y)
    assert res.top1 < 0.35  # chance is 0.2 (five balanced classes, 200 test samples)
    # Reproducible: the same inputs give the same probe.
    again = probes.linear_probe(train_x, shuffled, test_x, test_y)
    assert (again.top1, again.weight_decay) == (res.top1, res.weight_decay)


def test_knn_separable_and_shuffled():
    train_x, train_y = separable_features(300, seed=0)
    test_x, test_y = separable_features(200, seed=1)
    acc = probes.knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    assert acc["top1"] == 1.0
    gen = torch.Generator().manual_seed(3)
    shuffled = train_y[torch.randperm(len(train_y), generator=gen)]
    assert probes.knn_accuracy(train_x, shuffled, test_x, test_y, k=20)["top1"] < 0.35
    # Leave-one-out on one set: each point is classified by its neighbours, not by itself.
    loo = probes.knn_accuracy(test_x, test_y, test_x, test_y, exclude_self=True)
    assert loo["top1"] == 1.0
    noise_y = torch.randint(0, NUM_CLASSES, (200,), generator=gen)
    assert probes.knn_accuracy(test_x, noise_y, test_x, noise_y, exclude_self=True)["top1"] < 0.35
    # Without exclusion the query finds itself at similarity 1 and weight exp(1/T): near 100%.
    assert probes.knn_accuracy(test_x, noise_y, test_x, noise_y)["top1"] > 0.9


def test_knn_votes_are_temperature_weighted():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # Two neighbours of class 1 at cosine 0.8 outvote one of class 0 at cosine 1.0 when votes are
    # nearly flat (large T), not when the temperature is small.
    assert probes.knn_scores(bank, labels, query, 2, k=3, temperature=100.0).argmax() == 1
    assert probes.knn_scores(bank, labels, query, 2, k=3, temperature=0.07).argmax() == 0


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    labels = torch.tensor([2, 0])
    assert probes.topk_accuracy(scores, labels, ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}


def test_invariance_scores():
    z = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    same = probes.invariance_scores(z, z * 3.0)  # scale does not change the direction
    assert abs(same["cosine"] - 1.0) < 1e-5 and same["retrieval_top1"] == 1.0
    other = probes.invariance_scores(z, torch.randn(50, 8))
    assert other["cosine"] < 0.5 and other["retrieval_top1"] < 0.2


def test_rank_of_a_known_low_rank_matrix():
    from lsdr_repr.eval.frozen import embedding_rank

    gen = torch.Generator().manual_seed(0)
    n, dim, r = 400, 64, 5
    # Z = U S V^T with r equal singular values and zero-mean columns: RankMe = r exactly.
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    u = u - u.mean(dim=0)
    v, _ = torch.linalg.qr(torch.randn(dim, r, generator=gen, dtype=torch.float64))
    z = (u @ v.T).float() * 10
    result = embedding_rank(z)
    assert result["numerical_rank"] == r
    assert abs(result["rankme"] - r) < 0.3
    assert result["eigenvalues"].shape == (dim,)
    assert float(result["eigenvalues"][r]) < 1e-6 * float(result["eigenvalues"][0])
    full = embedding_rank(torch.randn(n, dim, generator=gen))
    assert full["numerical_rank"] == dim and full["rankme"] > 0.8 * dim


# ------------------------------------------------------------------ on real shards and models
COLOURS = [(200, 40, 40), (40, 180, 60), (50, 60, 210), (220, 200, 60)]


def write_image_folder(root: Path, per_class: int, seed: int) -> Path:
    """Four classes of 40x40 JPEGs: a class colour with a textured square at a random place."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.empty((40, 40, 3), dtype=np.float64)
            img[:] = colour
            y, x = rng.integers(0, 20, size=2)
            img[y:y + 20, x:x + 20] = 255 - np.asarray(colour)
            img += rng.normal(0, 12, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                root / f"class{c}" / f"{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from data_pipelines.writer import write_shards

    root = tmp_path_factory.mktemp("evaldata")
    out = {}
    for split, n, seed in (("train", 12, 0), ("val", 6, 1)):
        folder = write_image_folder(root / f"{split}-images", n, seed)
        out[f"{split}_folder"] = folder
        out[split] = write_shards(folder, root / split, prefix=split, max_count=16,
                                  workers=0).out
    unlabelled = root / "flat-images"
    unlabelled.mkdir()
    for p in list((out["val_folder"] / "class0").iterdir())[:4]:
        (unlabelled / p.name).write_bytes(p.read_bytes())
    out["unlabelled"] = write_shards(unlabelled, root / "unlabelled", prefix="u", workers=0).out
    return out


@pytest.fixture()
def run(tmp_path) -> Path:
    ckpt, _ = make_run(tmp_path / "run", "resnet10t", {}, crop=32)
    return ckpt.parent.parent


def test_knn_linear_rank_cli_write_results_and_reuse_cached_features(data, run, caplog, capsys):
    common = ["--train", str(data["train"]), "--val", str(data["val"]), "--workers", "0"]
    assert main(["eval", "knn", str(run), *common]) == 0
    knn = json.loads((run / "eval" / "knn.json").read_text())
    # Colour classes are easy for any backbone, even one that has barely trained.
    assert knn["metrics"]["top1"] >= 0.9 and knn["details"]["num_val"] == 24
    assert knn["step"] == 7 and knn["metrics"]["k"] == 20
    assert "top1" in capsys.readouterr().out
    cached = sorted((run / "eval" / "cache").glob("features-*.safetensors"))
    assert len(cached) == 2  # train and val, computed once

    caplog.set_level(logging.INFO, logger="lsdr_repr.eval")
    assert main(["eval", "linear", str(run), *common]) == 0
    assert sum("from cache" in r.message for r in caplog.records) == 2
    linear = json.loads((run / "eval" / "linear.json").read_text())
    assert linear["metrics"]["top1"] >= 0.9
    assert sorted((run / "eval" / "cache").glob("features-*.safetensors")) == cached

    assert main(["eval", "rank", str(run), "--data", str(data["val"]), "--workers", "0"]) == 0
    rank = json.loads((run / "eval" / "rank.json").read_text())
    assert 1.0 <= rank["metrics"]["rankme"] <= rank["metrics"]["num_features"] == 512
    assert len(rank["details"]["eigenvalues"]) == 512
    png = Path(rank["details"]["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_folder_input_matches_the_shards(data, run):
    trained = load_trained_backbone(run)
    a = extract_features(trained.backbone, data["val"], 32, trained.mean, trained.std,
                                  num_workers=0)
    b = extract_features(trained.backbone, data["val_folder"], 32, trained.mean,
                                  trained.std, num_workers=0)
    # Same images, same classes; the shards hold the JPEG bytes of the folder unchanged or
    # re-encoded, so the embeddings agree closely but not bit for bit.
    assert a.x.shape == b.x.shape == (24, 512)
    order_a, order_b = a.y.argsort(stable=True), b.y.argsort(stable=True)
    assert torch.equal(a.y[order_a], b.y[order_b])
    cos = torch.nn.functional.cosine_similarity(a.x[order_a], b.x[order_b]).min()
    assert cos > 0.9


def test_unreadable_images_of_a_folder_are_skipped_counted_and_named(data, run, tmp_path,
                                                                    caplog):
    """A truncated JPEG in an ImageFolder: skipped and counted, as the shard reader does, with
    its path in the log; a folder of nothing but such files is one line."""
    folder = tmp_path / "val-images"
    shutil.copytree(data["val_folder"], folder)
    good = next((folder / "class1").iterdir())
    (folder / "class1" / "broken.jpg").write_bytes(good.read_bytes()[:300])  # truncated
    (folder / "class2" / "notes.jpg").write_text("not an image")
    trained = load_trained_backbone(run)
    feats = extract_features(trained.backbone, folder, 32, trained.mean, trained.std,
                             num_workers=1, batch_size=8)  # the skip happens in a worker
    assert feats.x.shape == (24, 512) and feats.skipped == 2
    caplog.set_level(logging.WARNING, logger="lsdr_repr.eval")
    in_process = extract_features(trained.backbone, folder, 32, trained.mean, trained.std,
                                  num_workers=0)
    assert in_process.skipped == 2
    named = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.jpg" in named and "notes.jpg" in named
    # one image per batch: whole batches unreadable, the last one too (class3/zz.jpg)
    (folder / "class3" / "zz.jpg").write_bytes(b"\xff\xd8 truncated")
    images = load_images01(folder, 32, max_images=100, batch_size=1, num_workers=0)
    assert images.shape == (24, 3, 32, 32)
    from lsdr_repr.eval.finetune import _train_batches  # `lsdr eval finetune`'s training data

    batches = _train_batches(str(folder), 32, 10, 0, seed=0)
    drawn = [next(batches) for _ in range(6)]  # 24 readable images: past an epoch's end
    assert all(images.shape[1:] == (3, 32, 32) and 0 < len(labels) == len(images) <= 10
               for images, labels in drawn)  # a batch of 10 files less its unreadable ones

    only_bad = tmp_path / "bad-images"
    (only_bad / "a").mkdir(parents=True)
    (only_bad / "a" / "broken.jpg").write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match="no images were read"):
        extract_features(trained.backbone, only_bad, 32, trained.mean, trained.std,
                         num_workers=0)
    with pytest.raises(DataError, match="no images were read"):
        load_images01(only_bad, 32, max_images=10, num_workers=0)
    with pytest.raises(DataError, match="no readable images"):
        next(_train_batches(str(only_bad), 32, 10, 0, seed=0))


def test_online_knn_leave_one_out_and_missing_labels(data, run, capsys):
    trained = load_trained_backbone(run)
    trained.backbone.train()
    acc = online_knn(trained.backbone, data["val"], 32, trained.mean, trained.std,
                              num_workers=0, k=5)
    assert acc["top1"] >= 0.9
    assert trained.backbone.training  # mode given back to the trainer
    with pytest.raises(DataError, match="have no label"):
        online_knn(trained.backbone, data["unlabelled"], 32, trained.mean, trained.std,
                            num_workers=0)
    code = main(["eval", "knn", str(run), "--train", str(data["unlabelled"]), "--val",
                 str(data["val"]), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unlabelled" in err
    # on a terminal, with the bars on, the error is still one line of its own after the
    # finished bar (another --out: features not cached, so the bar is drawn)
    done = run_on_a_terminal(["eval", "knn", str(run), "--train", str(data["unlabelled"]),
                              "--val", str(data["val"]), "--workers", "0",
                              "--out", str(run / "bars")])
    assert f"features of {data['unlabelled']}" in final_bars(done.err), done.err
    last = done.err.splitlines()[-1]
    assert done.returncode == 2 and last.startswith("lsdr: error: ") and "unlabelled" in last


def _online_knn_worker(rank: int, port: int, run: str, sources: list[str], out: str) -> None:
    from lsdr_repr import distributed as d

    torch.set_num_threads(1)
    env = d.read_dist_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    d.init_distributed(env, "cpu", connect_timeout_s=60)
    trained = load_trained_backbone(run)
    scores = [online_knn(trained.backbone, src, 32, trained.mean, trained.std, device="cpu",
                         num_workers=0, k=5) for src in sources]
    torch.save(scores, f"{out}/rank{rank}.pt")
    d.cleanup()


@pytest.mark.distributed
def test_online_knn_on_two_ranks_scores_the_whole_set_on_each(data, run, tmp_path):
    """Each rank embeds its share (shards, or every other image of a folder), the shares are
    gathered, and both ranks report the one-process scores of the whole set."""
    from tests.test_distributed import _free_port

    trained = load_trained_backbone(run)
    sources = [str(data["val"]), str(data["val_folder"])]
    alone = [online_knn(trained.backbone, src, 32, trained.mean, trained.std, device="cpu",
                        num_workers=0, k=5) for src in sources]
    torch.multiprocessing.start_processes(
        _online_knn_worker, args=(_free_port(), str(run), sources, str(tmp_path)), nprocs=2,
        start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]
    for together, one in zip(ranks[0], alone, strict=True):
        # the same 24 images and labels; batches of other sizes may move a float by 1e-7
        assert together.keys() == one.keys()
        assert all(abs(together[k] - one[k]) <= 1 / 24 + 1e-9 for k in one)


def test_finetune_trains_a_new_head(data, run):
    done = run_on_a_terminal(["eval", "finetune", str(run), "--train", str(data["train"]),
                              "--val", str(data["val"]), "--epochs", "6", "--batch-size", "16",
                              "--workers", "0", "--lr", "0.1"])
    assert done.returncode == 0, done.err
    res = json.loads((run / "eval" / "finetune.json").read_text())
    assert res["details"]["steps"] == 18 and res["details"]["num_classes"] == 4
    # The new head and the backbone learn the colour classes (chance: 0.25).
    assert res["metrics"]["top1"] >= 0.9
    # progress on the terminal: every step (with its loss), then the 24 val images
    bars = final_bars(done.err)
    assert "100%" in bars["fine-tuning 6 epochs"] and "18/18" in bars["fine-tuning 6 epochs"]
    assert "loss=" in bars["fine-tuning 6 epochs"]
    assert "24/24" in bars[f"fine-tuned top-1 on {data['val']}"]


def test_linear_and_invariance_show_progress_bars_on_a_terminal(data, run):
    common = ["--workers", "0", "--out", str(run / "bars")]
    done = run_on_a_terminal(["eval", "linear", str(run), "--train", str(data["train"]),
                              "--val", str(data["val"]), "--weight-decays", "1e-4,1e-2", *common])
    assert done.returncode == 0, done.err
    bars = final_bars(done.err)
    # the train split (48 images, its total from the manifest), the val split, 2 + 1 fits
    assert "48/48" in bars[f"features of {data['train']}"]
    assert "24/24" in bars[f"features of {data['val']}"]
    assert "3/3" in bars["linear probe (L-BFGS fits)"]
    done = run_on_a_terminal(["eval", "invariance", str(run), "--data", str(data["val"]),
                              "--families", "rotate", "--reference", "none", "--max-images", "8",
                              *common])
    assert done.returncode == 0, done.err
    cells = invariance.num_cells(("rotate",))
    assert f"{cells}/{cells}" in final_bars(done.err)["invariance of 8 images"]
    # --no-progress: nothing on the terminal but the log (no bar frames)
    done = run_on_a_terminal(["eval", "linear", str(run), "--train", str(data["train"]),
                              "--val", str(data["val"]), "--no-progress", *common])
    assert done.returncode == 0 and "INFO" in done.err
    assert not final_bars(done.err) and "\r" not in done.err


def test_no_progress_bars_are_drawn_into_a_log_file(data, run, tmp_path):
    """stderr redirected to a file (SLURM's output, nohup's): the bars, whose redraws would
    arrive joined by carriage returns, are left out; the log lines are all there."""
    done = run_into_a_log(["eval", "linear", str(run), "--train", str(data["train"]), "--val",
                           str(data["val"]), "--weight-decays", "1e-4,1e-2", "--workers", "0",
                           "--out", str(run / "logged")], tmp_path / "eval.log")
    assert done.returncode == 0, done.err
    assert "top1" in done.out
    assert "\r" not in done.err and not final_bars(done.err), done.err
    assert "48/48" not in done.err and "L-BFGS" not in done.err
    lines = done.err.splitlines()
    assert all(" INFO " in line or " WARNING " in line for line in lines), lines
    assert any(f"INFO lsdr_repr.eval.cache: features of {data['train']}: 48 x " in line
               for line in lines), lines


def test_finetune_counts_shards_without_a_manifest(data, run, tmp_path):
    """Shards without manifest.json (another writer's, or a copy): one pass counts them."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in Path(data["train"]).glob("*.tar"):  # the shards alone
        shutil.copy(shard, bare / shard.name)
    assert main(["eval", "finetune", str(run), "--train", str(bare), "--val",
                 str(data["val"]), "--epochs", "1", "--batch-size", "16", "--workers", "0",
                 "--out", str(tmp_path / "res")]) == 0
    res = json.loads((tmp_path / "res" / "finetune.json").read_text())
    with_manifest = count_labelled(str(data["train"]), 8, Evaluator(
        load_trained_backbone(run), None, "cpu", batch_size=16, num_workers=0))
    assert res["details"]["num_classes"] == with_manifest[1] == 4
    assert res["details"]["steps"] == with_manifest[0] // 16


def test_cli_defaults_and_errors(run, capsys, tmp_path):
    # The run's config has no data.val_shards: the flag must be given.
    assert main(["eval", "knn", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--val/--data is required" in err
    # An export knows no data at all: both flags are named in the one line.
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", str(tmp_path / "exported"), "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train and --val/--data are required" in err, err
    assert main(["eval", "rank", str(run / "nothing-here")]) == 2
    assert "no such run directory" in capsys.readouterr().err


class ConstantEncoder(torch.nn.Module):
    """Ignores its input: perfectly invariant, and useless for retrieval."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 8, device=x.device)


def test_invariance_is_one_for_a_constant_encoder_and_drops_for_a_random_one(data):
    import timm

    images = load_images01(data["val"], 32, max_images=24, num_workers=0)
    assert images.shape == (24, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    table = backbone_invariance_table(ConstantEncoder(), images, mean, std)
    assert set(table) == {"brightness", "rotate/zeros", "rotate/reflection", "zoom_out/zeros",
                          "zoom_out/reflection", "zoom_in", "combined/zeros",
                          "combined/reflection"}
    for row in table.values():
        for cell in row.values():
            assert cell["cosine"] == pytest.approx(1.0, abs=1e-6)
            assert cell["cosine_centered"] == 0.0  # nothing left once the constant is removed
            assert cell["retrieval_top1"] == pytest.approx(1 / 24)  # ties: no retrieval at all

    torch.manual_seed(0)
    random_net = timm.create_model("resnet10t", num_classes=0).eval()
    table = backbone_invariance_table(random_net, images, mean, std, families=("rotate",))
    assert set(table) == {"rotate/zeros", "rotate/reflection"}
    small, large = table["rotate/zeros"]["15"], table["rotate/zeros"]["60"]
    # Pooled ReLU features of any two images are close in raw cosine; the centred cosine and
    # the retrieval show the change, more for the larger angle.
    assert large["cosine_centered"] < small["cosine_centered"] < 0.999
    assert large["retrieval_top1"] <= small["retrieval_top1"] and large["retrieval_top1"] < 0.5
    # no randomness: the table is reproducible
    again = backbone_invariance_table(random_net, images, mean, std, families=("rotate",))
    assert again == table


def test_demo_report_compares_trained_and_random_init(data, tmp_path):
    from PIL import Image

    from tests.wandb_history import read_wandb_history

    ckpt, _ = make_run(tmp_path / "run", "resnet10t", {}, crop=32, wandb_run_id="demorun1",
                       log={"wandb": {"mode": "offline", "project": "lsdr-test"}})
    run = ckpt.parent.parent
    report = demo_report(run, str(data["train"]), str(data["val"]), device="cpu",
                                  max_invariance_images=16)
    # the invariance plot: a PNG in RUN_DIR/eval, named in the report, and in the W&B run
    png = run / "eval" / "demo_invariance.png"
    assert report["invariance_plot"] == str(png)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 2 * image.size[1] > 500  # two panels
    assert any(r.get("eval/demo/invariance", {}).get("_type") == "image-file"
               for r in read_wandb_history(run))
    assert set(report["linear"]) == {"trained", "random_init"}
    for m in report["linear"].values():
        assert 0.0 <= m["top1"] <= 1.0
    assert set(report["invariance"]["trained"]) == {r for r, _, _ in invariance.rows()}
    saved = json.loads((run / "eval" / "demo.json").read_text())
    assert saved["metrics"]["linear_top1_trained"] == report["linear"]["trained"]["top1"]
    text = format_report(report)
    assert "random_init" in text and "zoom_out/zeros" in text and "step-00000007.pt" in text
    assert f"invariance plot (retrieval against strength): {png}" in text
    # the data's four colour classes: the demo prints the timm line with the real count
    assert report["num_classes"] == 4
    from lsdr_repr.cli.demo import load_snippet

    assert load_snippet("runs/demo/export", report["num_classes"]).endswith(
        'pretrained=True, num_classes=4)')


def test_results_are_logged_to_the_runs_wandb_run(data, tmp_path):
    from tests.wandb_history import read_wandb_history

    ckpt, _ = make_run(tmp_path / "run", "resnet10t", {}, crop=32, wandb_run_id="evalrun1",
                       log={"wandb": {"mode": "offline", "project": "lsdr-test"}})
    run = ckpt.parent.parent
    assert main(["eval", "rank", str(run), "--data", str(data["val"]), "--workers", "0"]) == 0
    rows = read_wandb_history(run)
    logged = [r for r in rows if "eval/rank/rankme" in r]
    assert len(logged) == 1 and logged[0]["_step"] == 7
    rank = json.loads((run / "eval" / "rank.json").read_text())
    assert logged[0]["eval/rank/rankme"] == pytest.approx(rank["metrics"]["rankme"])
    assert any("eval/rank/spectrum" in r for r in rows)
    assert list((run / "wandb").glob("offline-run-*-evalrun1"))  # the run's own id
