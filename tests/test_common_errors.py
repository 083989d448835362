"""Error paths of common/: a folder that cannot be made (non-essential writes, the metrics cache), --*-every 0, an
empty checkpoint file, which checkpoint a failed write or a NaN names as the last good one, --compile on old torch."""
import argparse
import errno
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common.output as output
from common.metrics import Evaluator, find_inception
from common.output import load_checkpoint, resume, save_checkpoint, save_grid, writing
from common.run import add_common_args, check_finite, compiled, error_line, UserError


@pytest.fixture
def under_a_file(tmp_path):
    """A path whose parent is a plain file: no folder can be made there."""
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile"


def test_non_essential_write_whose_folder_cannot_be_made_warns_once(under_a_file, capsys):
    output._WARNED.clear()
    for _ in range(2):
        assert save_grid(torch.zeros(4, 3, 8, 8), str(under_a_file / "samples" / "000001.png"))
    err = capsys.readouterr().err
    assert err.count("warning: cannot write") == 1 and "(not a directory)" in err, err
    with pytest.raises(UserError, match=r"cannot write .*args.json \(not a directory\); no checkpoint was written"):
        output._SAVED.update(path=None, step=None)
        with writing(str(under_a_file / "run" / "args.json")) as tmp, open(tmp, "w") as f:
            f.write("{}")


def test_real_stats_cache_is_exact_and_unwritable_cache_only_warns(tmp_path, under_a_file, capsys):
    """The .npz is written at the stats path itself (np.savez adds no suffix to a file object) and read back; a cache
    folder that cannot be made warns once and the statistics are still returned."""
    def evaluator(path):
        ev = Evaluator.__new__(Evaluator)
        ev.ds, ev.n_real, ev.batch, ev.available, ev.protocol, ev._real = range(10), 10, 4, True, "p", None
        ev.stats_path = lambda: str(path)
        ev.features = lambda batches: np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
        return ev
    good = tmp_path / "stats" / "x.npz"
    first = evaluator(good).real_stats()
    assert os.listdir(tmp_path / "stats") == ["x.npz"]
    again = evaluator(good)
    again.features = None  # from the cache, no extraction
    assert np.array_equal(again.real_stats()["feats"], first["feats"])
    output._WARNED.clear()
    assert evaluator(under_a_file / "stats" / "x.npz").real_stats()["mu"].shape == (3,)
    assert capsys.readouterr().err.count("warning: cannot write") == 1


def test_weight_caches_under_a_file_are_one_user_error(clean_env, under_a_file, monkeypatch):
    from common.weights import fetch
    monkeypatch.setenv("GAN_METRICS_CACHE", str(under_a_file / "cache"))
    with pytest.raises(UserError, match="could not be downloaded .*NotADirectoryError"):
        find_inception()
    monkeypatch.setenv("TORCH_HOME", str(under_a_file / "torch"))  # the hub folder fails before any connection
    with pytest.raises(UserError, match="cannot download http://127.0.0.1:9/w.pth .NotADirectoryError"):
        fetch("http://127.0.0.1:9/w.pth")


@pytest.mark.parametrize("flag", ["--log-every", "--sample-every", "--ckpt-every"])
def test_every_flags_must_be_positive(flag, capsys):
    p = argparse.ArgumentParser()
    add_common_args(p, res=32, batch=8, iters=10, lr=2e-4)
    assert getattr(p.parse_args([flag, "5"]), flag[2:].replace("-", "_")) == 5
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            p.parse_args([flag, bad])
        assert e.value.code == 2 and f"argument {flag}: invalid value '{bad}'" in capsys.readouterr().err


def test_empty_or_missing_checkpoint_is_one_line(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_checkpoint(str(tmp_path / "empty.pt"))
    assert str(e.value).startswith(f"cannot read checkpoint {tmp_path / 'empty.pt'} (") and "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist: pass the path of an existing checkpoint .pt file$"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    assert error_line(EOFError("")) == "EOFError" and error_line(ValueError("a\nb"), 1) == "ValueError: a"


def test_only_last_pt_is_named_as_the_last_good_checkpoint(tmp_path, monkeypatch):
    """best.pt is not what --resume auto loads: a failed write names the last last.pt, or none; resuming from another
    run's checkpoint does not count either."""
    output._SAVED.update(path=None, step=None)
    ckpt = tmp_path / "run" / "ckpt"
    save_checkpoint({"step": 3}, str(ckpt / "best.pt"))

    def boom(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(UserError, match="no checkpoint was written yet"):
        save_checkpoint({"step": 4}, str(ckpt / "last.pt"))
    monkeypatch.undo()
    save_checkpoint({"step": 4}, str(ckpt / "last.pt"))
    save_checkpoint({"step": 6}, str(ckpt / "best.pt"))
    assert output._SAVED == {"path": str(ckpt / "last.pt"), "step": 4}
    output._SAVED.update(path=None, step=None)
    args = argparse.Namespace(out=str(tmp_path / "other"), seed=0)
    ck = {"step": 4, "rng": output.rng_state(), "G": torch.nn.Linear(2, 2).state_dict()}
    resume(ck, str(ckpt / "last.pt"), {"G": torch.nn.Linear(2, 2)}, SimpleNamespace(rank=0, is_main=False), args)
    assert output._SAVED["path"] is None
    args.out = str(tmp_path / "run")
    resume(ck, str(ckpt / "last.pt"), {"G": torch.nn.Linear(2, 2)}, SimpleNamespace(rank=0, is_main=False), args)
    assert output._SAVED["path"] == str(ckpt / "last.pt")


def test_nan_names_last_pt_only_when_it_exists(tmp_path):
    with pytest.raises(UserError, match=r"run without --amp; no checkpoint was written yet$"):
        check_finite({"g": float("nan")}, 5, str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=f"the last good checkpoint is {tmp_path / 'ckpt' / 'last.pt'}$"):
        check_finite({"g": float("inf")}, 5, str(tmp_path))
    with pytest.raises(UserError, match=r"run without --amp$"):
        check_finite({"g": float("nan")}, 5)


def test_compile_raises_the_recompile_limit_under_either_name(monkeypatch):
    import torch._dynamo
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    for cfg in (SimpleNamespace(cache_size_limit=8), SimpleNamespace(recompile_limit=8, cache_size_limit=8)):
        monkeypatch.setattr(torch._dynamo, "config", cfg)
        net = torch.nn.Linear(2, 2)
        assert compiled(net, "default") is net
        assert getattr(cfg, "recompile_limit", cfg.cache_size_limit) == 64
