"""kill -9 at random points and inside a checkpoint write, without any data set (a synthetic one in a
subprocess), so the fault injection runs in CI: each run killed after its first checkpoint is
resumed from it (and one killed inside a checkpoint write is resumed, or rerun when no complete
checkpoint existed yet), and ends bit-identical to an uninterrupted run."""
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from bip_fast.files import checkpoint as ckpt
from bip_fast.files.runlock import LOCK_NAME

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# BiP with a dense phase (2 segments), 4 epochs in all, on 320 synthetic images.
RUN = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from test_loop import config, synthetic, tiny_model
from bip_fast.engine.loop import Trainer
out, resume = sys.argv[1], sys.argv[2] == "resume"
cfg = config(out, resume=resume) if resume else config(out, method="bip", pretrain_epochs=2, epochs=2, lr=0.05)
Trainer(cfg, dataset=synthetic(n_train=320), model_fn=tiny_model).run()
"""


def _start(out, mode="fresh"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    code = RUN.format(tests=TESTS, root=ROOT)
    return subprocess.Popen([sys.executable, "-c", code, str(out), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(out, mode):
    p = _start(out, mode)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def _model(out):
    return ckpt.load(out / "model.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "ref"
    t0 = time.perf_counter()
    _finish(out, "fresh")
    return _model(out), time.perf_counter() - t0


def _continue_and_compare(out, reference, must_resume=False):
    has_checkpoint = (out / "checkpoint.pt").is_file()
    assert has_checkpoint or not must_resume, "killed before its first checkpoint: nothing to resume"
    mode = "resume" if has_checkpoint else "fresh"  # no checkpoint: rerun, no --force
    _finish(out, mode)
    got, want = _model(out), reference[0]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])]
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_at_a_random_point_then_resume_is_bit_identical(tmp_path, reference, seed):
    """Killed at a random point after the first checkpoint (so the continuation really resumes)."""
    out = tmp_path / "run"
    frac = random.Random(seed).uniform(0.0, 0.4)
    for _ in range(6):
        shutil.rmtree(out, ignore_errors=True)
        p = _start(out)
        while p.poll() is None and not (out / "checkpoint.pt").is_file():
            time.sleep(0.002)
        time.sleep(frac * reference[1])  # somewhere in the rest of the run
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=600)
            break
        p.communicate(timeout=600)
        frac /= 4  # the run ended first: kill sooner
    else:
        pytest.fail("the run always finished before the kill")
    _continue_and_compare(out, reference, must_resume=True)


def test_kill_inside_a_checkpoint_write_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    hit = False
    for _ in range(5):  # the temporary file lives for milliseconds: poll for it, a few tries
        p = _start(out)
        while p.poll() is None:
            if list(out.glob(".checkpoint.pt.*.tmp")):
                p.kill()
                hit = True
                break
            time.sleep(0.0005)
        p.communicate(timeout=600)
        if hit:
            break
        for f in out.iterdir():
            f.unlink()
    if not hit:
        pytest.skip("never caught a checkpoint write in flight (too fast on this machine)")
    assert not (out / "checkpoint.pt").exists() or ckpt.load(out / "checkpoint.pt")  # old or absent, never torn
    _continue_and_compare(out, reference)
