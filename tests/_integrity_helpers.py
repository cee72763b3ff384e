"""Helpers shared by the test_integrity_* files: a byte flip inside a torch file, a one-epoch tiny run."""

from bip_fast.engine.loop import Trainer

from test_loop import config, synthetic, tiny_model


def flip_tensor_bytes(path, n=32):
    """Flip ``n`` bytes in the middle of the largest tensor record of a torch zip file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    mid = start + info.file_size // 2
    for i in range(mid, mid + n):
        raw[i] ^= 0x5A
    open(path, "wb").write(bytes(raw))


def poison_second_batch(trainer, value=float("nan")):
    """Make the trainer's second training batch hold one ``value`` (NaN/inf) pixel."""
    calls = {"n": 0}

    def shard(batch):
        calls["n"] += 1
        if calls["n"] != 2:
            return batch
        x = batch[0].clone()
        x.view(-1)[0] = value
        return x, batch[1]

    trainer._shard = shard
    return trainer


def run_tiny(out, **kw):
    base = dict(command="pretrain", method="dense", epochs=1, lr=0.05)
    base.update(kw)
    tr = Trainer(config(out, **base), dataset=synthetic(), model_fn=tiny_model)
    return tr, tr.run()
