"""``python -m bip_fast``: every command on a tiny CIFAR-10 subset, and bad input (exit 2, one
line on stderr, nothing overwritten)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bip_fast.cli import main
from bip_fast.models import build

DATA = os.environ.get("BIP_FAST_TEST_DATA",
                      os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))
HAVE_DATA = os.path.isfile(os.path.join(DATA, "cifar-10-batches-py", "test_batch")) or \
    os.path.isfile(os.path.join(DATA, "test_batch"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"CIFAR-10 not found at {DATA} (set BIP_FAST_TEST_DATA)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICK = ["--arch", "resnet20", "--data-dir", DATA, "--subset", "64", "50", "--batch-size", "32",
         "--test-batch-size", "50", "--device", "cpu", "--epochs", "1", "--no-progress"]


def cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bip_fast", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    if not HAVE_DATA:
        pytest.skip(f"CIFAR-10 not found at {DATA}")
    out = tmp_path_factory.mktemp("cli") / "dense"
    r = cli("pretrain", *QUICK, "--out", out)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["command"] == "pretrain" and rep["density"] == 1.0
    return out


@needs_data
def test_pretrain_writes_plain_model(dense_run):
    sd = torch.load(dense_run / "model.pt")
    build("resnet20").load_state_dict(sd)  # plain state dict of the architecture
    lines = (dense_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1


@needs_data
def test_prune_eval_export_finetune(dense_run, tmp_path):
    run = tmp_path / "bip"
    r = cli("prune", *QUICK, "--method", "bip", "--sparsity", "0.9", "--pretrained", dense_run, "--out", run)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["kept"] == int(0.1 * rep["prunable"] + 0.5)

    r = cli("eval", "--checkpoint", run, "--data-dir", DATA, "--subset", "64", "50", "--device", "cpu")
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["kept"] == rep["kept"] and ev["test_samples"] == 50
    assert ev["test_acc"] == pytest.approx(rep["test_acc"])

    exp = tmp_path / "export"
    cli("export", "--checkpoint", run, "--out", exp)
    plain = build("resnet20")
    plain.load_state_dict(torch.load(exp / "model_dense_format.pt"))
    nz = sum(int((m.weight != 0).sum()) for m in plain.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert nz <= rep["kept"]
    masks = torch.load(exp / "masks.pt")["masks"]
    assert sum(int(m.sum()) for m in masks.values()) == rep["kept"]
    # export refuses to overwrite
    r = cli("export", "--checkpoint", run, "--out", exp, check=False)
    assert r.returncode == 2 and "already holds" in r.stderr

    ft = tmp_path / "ft"
    r = cli("finetune", *QUICK, "--checkpoint", run / "model.pt", "--out", ft)
    rep_ft = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep_ft["kept"] == rep["kept"]  # the mask stays fixed
    sd = torch.load(ft / "model.pt")
    for k, v in torch.load(run / "model.pt").items():
        if k.endswith(".mask"):
            assert torch.equal(sd[k], v), k


@needs_data
def test_config_file_and_flag_override(dense_run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  arch: resnet20\nprune:\n  method: omp\n  sparsity: 0.5\ntrain:\n  lr: 0.05\n")
    run = tmp_path / "omp"
    r = cli("prune", "--config", cfg, *QUICK, "--sparsity", "0.8", "--pretrained", dense_run / "model.pt",
            "--out", run)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["method"] == "omp" and rep["kept"] == int(0.2 * rep["prunable"] + 0.5)
    import yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.05 and saved["prune"]["sparsity"] == 0.8
    # resuming a finished run with a different hyper-parameter is refused
    before = (run / "checkpoint.pt").read_bytes()
    r = cli("prune", "--out", run, "--resume", "--sparsity", "0.7", check=False)
    assert r.returncode == 2 and "--sparsity" in r.stderr
    assert (run / "checkpoint.pt").read_bytes() == before


def _bad(capsys, argv, expect):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,expect", [
    (["prune", "--arch", "resnet99", "--out", "X"], "arch"),
    (["prune", "--method", "lasso", "--out", "X"], "method"),
    (["prune", "--sparsity", "1.0", "--out", "X"], "sparsity"),
    (["prune", "--sparsity", "-0.1", "--out", "X"], "sparsity"),
    (["prune", "--structure", "rows", "--out", "X"], "structure"),
    (["prune", "--epochs", "0", "--out", "X"], "epochs"),
    (["prune", "--sparsity", "abc", "--out", "X"], "sparsity"),
    (["pretrain", "--method", "bip", "--out", "X"], "method"),
    (["prune"], "out"),
    (["eval"], "checkpoint"),
    (["prune", "--config", "MISSING.yaml", "--out", "X"], "--config"),
])
def test_bad_arguments(capsys, tmp_path, argv, expect):
    argv = [str(tmp_path / a) if a in ("X", "MISSING.yaml") else a for a in argv]
    _bad(capsys, argv, expect)
    assert not (tmp_path / "X").exists()


def test_missing_data_dir(capsys, tmp_path):
    out = tmp_path / "run"
    line = _bad(capsys, ["pretrain", "--arch", "resnet20", "--device", "cpu", "--data-dir",
                         str(tmp_path / "nodata"), "--out", str(out)], "cifar10")
    assert "nodata" in line
    assert not out.exists()


def test_corrupt_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x00garbage")
    _bad(capsys, ["prune", "--out", str(run), "--resume"], "corrupt")
    _bad(capsys, ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cpu"], "corrupt")
    _bad(capsys, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")], "corrupt")
    assert (run / "checkpoint.pt").read_bytes() == b"\x00garbage"
    assert not (tmp_path / "exp").exists()


def test_out_holding_another_run(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    _bad(capsys, ["pretrain", "--out", str(run)], "already holds a run")
    assert (run / "metrics.jsonl").read_text() == "{}\n"


def test_subprocess_error_is_one_line(tmp_path):
    r = cli("prune", "--sparsity", "1.5", "--out", tmp_path / "x", check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "sparsity" in r.stderr


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_shipped_configs_validate(name):
    from bip_fast.engine.hparams import RunConfig

    cfg = RunConfig.from_yaml(os.path.join(ROOT, "configs", name))
    cfg.command = "pretrain" if cfg.prune.method == "dense" else "prune"
    cfg = cfg.resolved()
    dataset = cfg.data.dataset
    assert cfg.train.momentum == 0.9 and cfg.data.batch_size == {"imagenet": (200 if "bip" in name else 256)}.get(dataset, 128)
    if cfg.prune.method == "bip" and cfg.prune.variant == "paper":
        # the paper's text (named config) or bip_fast's defaults (weight lr 0.1, score lr from the step count);
        # Tiny-ImageNet / ImageNet: the authors' per-dataset settings with the score lr explicit
        want = (100, 0.01, 0.1, 1.0) if "paper" in name else (100, 0.1, None, 1.0)
        want = {"tiny-imagenet": (100, 0.1, 0.1, 1.0), "imagenet": (100, 0.01, 0.1, 1.0)}.get(dataset, want)
        assert (cfg.train.epochs, cfg.train.lr, cfg.prune.score_lr, cfg.prune.gamma) == want


@needs_data
def test_imp_from_a_model_without_rewind_weights_is_refused(dense_run, tmp_path):
    """A 1-epoch pretrain keeps no rewind weights (the rewind point, epoch 3, is never reached), so
    IMP from it is refused with what to do, instead of silently rewinding to the converged model."""
    assert not (dense_run / "rewind.pt").exists()
    r = cli("prune", *QUICK, "--method", "imp", "--sparsity", "0.2", "--pretrained", dense_run,
            "--out", tmp_path / "imp", check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "rewind.pt" in lines[0] and "--rewind-to-pretrained" in lines[0]
    assert not (tmp_path / "imp" / "config.yaml").exists()


@needs_data
def test_prune_group_structure_then_export_compact(dense_run, tmp_path):
    """``--structure group``: the engine traces the channel groups on a batch of the data's shape,
    every prunable group keeps round(0.5 x channels) channels, and ``export --compact`` writes a
    smaller model that computes what the dense-format export computes."""
    import bip_fast

    run, exp = tmp_path / "group", tmp_path / "export"
    cli("prune", *QUICK, "--method", "bip", "--structure", "group", "--sparsity", "0.5", "--pretrained", dense_run,
        "--out", run)
    sd = torch.load(run / "model.pt")
    groups = [g for g in bip_fast.find_groups(build("resnet20"), torch.randn(2, 3, 32, 32)) if g.prunable]
    assert groups
    for g in groups:  # a channel's BatchNorm entries, over every BatchNorm of the group
        kept, seen = torch.zeros(g.channels, dtype=torch.bool), torch.zeros(g.channels, dtype=torch.bool)
        for m in g.members:
            if m.kind == "norm":
                kept[m.channel] |= sd[f"{m.name}.channel_mask"][m.index]
                seen[m.channel] = True
        assert bool(seen.all()) and int(kept.sum()) == max(1, round(0.5 * g.channels)), g.members[0].name

    r = cli("export", "--checkpoint", run, "--out", exp, "--compact")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["compact_params"] < 0.6 * rep["params"]
    small = torch.export.load(rep["compact"]).module()
    plain = build("resnet20").eval()
    plain.load_state_dict(torch.load(exp / "model_dense_format.pt"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y, ref = small(x), plain(x)
    assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@needs_data
def test_imp_filter_structure_from_the_cli(dense_run, tmp_path):
    """``prune --method imp --structure filter`` is IMP-F: the plan says it prunes filters, and one
    round at rate 0.2 leaves every conv layer with round(0.8 x filters) non-zero filters; a
    structure IMP cannot take is refused before anything is written."""
    run = tmp_path / "impf"
    r = cli("prune", *QUICK, "--method", "imp", "--structure", "filter", "--sparsity", "0.2", "--pretrained",
            dense_run, "--rewind-to-pretrained", "--out", run)
    assert "remaining filters of each layer" in r.stdout.splitlines()[0] + r.stderr
    masks = torch.load(run / "masks.pt")["masks"]
    convs = [n for n, mk in masks.items() if mk.dim() == 4]
    assert len(convs) > 10
    for n in convs:
        mk = masks[n]
        rows = mk.flatten(1)
        assert (rows.all(dim=1) | ~rows.any(dim=1)).all(), n  # whole filters
        kept = int(rows.all(dim=1).sum())
        assert kept == max(1, int(0.8 * mk.shape[0] + 0.5)), (n, kept, mk.shape[0])
    bad = cli("prune", *QUICK, "--method", "imp", "--structure", "layer", "--sparsity", "0.2", "--pretrained",
              dense_run, "--rewind-to-pretrained", "--out", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "imp prunes globally" in bad.stderr
    assert not (tmp_path / "bad").exists()
