"""One run, one record: a checkpoint of another run is refused; invalid settings fail before the folder is touched."""
import pytest
from torch import nn

from bip_fast.engine.loop import Trainer

from _integrity_helpers import run_tiny
from test_loop import config, synthetic, tiny_model


# ----------------------------------------------------------------------------- 2. one run, one record
def test_checkpoint_from_another_run_is_refused(tmp_path):
    run_tiny(tmp_path / "a")
    run_tiny(tmp_path / "b", arch="resnet56", command="pretrain")  # config records another arch
    (tmp_path / "b" / "checkpoint.pt").write_bytes((tmp_path / "a" / "checkpoint.pt").read_bytes())
    with pytest.raises(ValueError, match="arch='resnet20'.*arch='resnet56'.*do not belong to one run"):
        Trainer(config(tmp_path / "b", resume=True), dataset=synthetic(), model_fn=tiny_model)
    from bip_fast.engine.rundir import read_model_file as _read_model_file

    with pytest.raises(ValueError, match="do not belong to one run"):
        _read_model_file(tmp_path / "b" / "checkpoint.pt", "checkpoint")


# ----------------------------------------------------------------------------- 9-11. files
def test_invalid_structure_touches_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="sparsity: 2:4 pruning removes 0.5"):
        Trainer(config(out, method="bip", structure="nm", sparsity=0.3, epochs=1), dataset=synthetic(),
                model_fn=tiny_model).run()
    assert not out.exists()


def test_nm_on_a_depthwise_conv_names_the_layer(tmp_path):
    def depthwise():
        return nn.Sequential(nn.ConstantPad3d((0, 0, 0, 0, 0, 1), 0.0), nn.Conv2d(4, 8, 3, padding=1),
                             nn.Conv2d(8, 8, 3, groups=8), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 10))

    with pytest.raises(ValueError, match=r"layer '2' \(weight \(8, 1, 3, 3\)\) has 9"):
        Trainer(config(tmp_path / "run", method="bip", structure="nm", sparsity=0.5, pretrain_epochs=1, epochs=1),
                dataset=synthetic(), model_fn=depthwise).run()
    assert not (tmp_path / "run").exists()
