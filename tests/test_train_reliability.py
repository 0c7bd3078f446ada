"""Training that never loses a run (issue 14): non-finite steps, output dirs, resume checks, data position,
signals, disk failures, counts, loading errors, token-weighted loss. Tiny model, a few seconds each."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from llavit_kernels.data import SYNTHETIC_WORDS, SafeDataset, SampleProcessor, WordTokenizer, synthetic_samples  # noqa: E402
from llavit_kernels.train import TrainConfig, train, trainer  # noqa: E402
from llavit_kernels.train.demo import DemoSize, build_tiny  # noqa: E402
from llavit_kernels.train.trainer import (  # noqa: E402
    CheckpointError, NonFiniteError, ResumableBatchSampler, TrainingInterrupted, latest_checkpoint, save_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = DemoSize(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(SYNTHETIC_WORDS)


def _ds(tok, records):
    return SafeDataset(records, SampleProcessor(tok, SIZE.image_size, 16, 128))


def _cfg(out, **kw):
    base = dict(output_dir=str(out), stage=2, max_steps=4, batch_size=4, lr=3e-3, warmup_steps=1, progress=False,
                plot=False, overwrite=False)
    base.update(kw)
    return TrainConfig(**base)


def _strict_lines(path):
    def no_constant(name):
        raise ValueError(f"bare {name} in {path}")

    return [json.loads(line, parse_constant=no_constant) for line in open(path)]


def _finite_checkpoint(path):
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(v).all()) for v in load_file(os.path.join(path, "model.safetensors")).values())


class _NanAt:
    """Forward hook: the logits of the k-th forward call (1-based) become NaN."""

    def __init__(self, model, calls):
        self.n, self.calls = 0, set(calls)
        model.language_model.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.n += 1
        return out * float("nan") if self.n in self.calls else out


# ------------------------------------------------------------------------------------ 1. non-finite
def test_nonfinite_loss_stops_keeps_last_good_checkpoint_and_logs_strict_json(tok, tmp_path):
    model = build_tiny(tok, SIZE)
    _NanAt(model, {3})  # step 3 of 1-micro-batch steps
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan .* step 3.*checkpoint-2"):
        train(model, _ds(tok, synthetic_samples(16, 1, 2, SIZE.image_size)), _cfg(tmp_path, max_steps=6, save_every=1),
              pad_token_id=0)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "log.jsonl"]  # nothing after the NaN
    assert _finite_checkpoint(tmp_path / "checkpoint-2")
    lines = _strict_lines(tmp_path / "log.jsonl")  # no bare NaN
    assert [(r["step"], r["loss"]) for r in lines][-1] == (3, None) and lines[-1]["nonfinite"]


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(tok, tmp_path):
    model = build_tiny(tok, SIZE)
    _NanAt(model, {2, 4})
    out = train(model, _ds(tok, synthetic_samples(16, 1, 2, SIZE.image_size)),
                _cfg(tmp_path / "a", max_steps=4, max_bad_steps=2), pad_token_id=0)
    assert out["step"] == 4 and out["nonfinite_steps"] == 2 and out["samples"] == 6 * 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model = build_tiny(tok, SIZE)
    _NanAt(model, {2, 4})
    with pytest.raises(NonFiniteError):
        train(model, _ds(tok, synthetic_samples(16, 1, 2, SIZE.image_size)),
              _cfg(tmp_path / "b", max_steps=4, max_bad_steps=1), pad_token_id=0)


def test_a_nonfinite_checkpoint_is_never_written(tok, tmp_path):
    model = build_tiny(tok, SIZE)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        next(model.projector.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite"):
        save_checkpoint(str(tmp_path / "checkpoint-1"), model, opt, sched, {"step": 1})
    assert os.listdir(tmp_path) == []


def test_cli_lr_1e6_exits_nonzero_with_a_message(tmp_path, capsys):
    """The issue's reproduction: stage 2 at lr 1e6 went NaN at step 3 and exited 0 with NaN checkpoints."""
    from llavit_kernels.train.__main__ import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--tiny", "--stage", "2", "--lr", "1e6", "--max-steps", "12", "--batch-size", "4",
              "--num-samples", "16", "--no-progress", "--save-every", "1", "--output-dir", str(out)])
    assert e.value.code == 1 and "non-finite" in capsys.readouterr().err
    for d in os.listdir(out):
        if d.startswith("checkpoint-"):
            assert _finite_checkpoint(out / d), d
    _strict_lines(out / "log.jsonl")


@pytest.mark.parametrize("flag,value,match", [
    ("--lr", "nan", "--lr: expected a finite number > 0, got nan"), ("--lr", "-1", "--lr"),
    ("--batch-size", "0", "--batch-size: expected an integer >= 1, got 0"), ("--grad-accum", "0", "--grad-accum"),
    ("--max-steps", "0", "--max-steps"), ("--max-grad-norm", "inf", "--max-grad-norm"),
    ("--weight-decay", "nan", "--weight-decay"), ("--warmup-steps", "-1", "--warmup-steps"),
    ("--trainable", "^projector=nan", "learning rate"), ("--max-length", "0", "--max-length"),
])
def test_hyper_parameters_are_checked_before_any_work(tmp_path, capsys, monkeypatch, flag, value, match):
    from llavit_kernels.train import __main__ as cli

    def no_work(*a, **k):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(cli, "build_model_and_tokenizer", no_work)
    monkeypatch.setattr(cli.torch.distributed, "init_process_group", no_work)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--tiny", "--output-dir", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------ 2. output dir and resume
def test_non_empty_output_dir_needs_resume_or_overwrite(tok, tmp_path):
    ds = _ds(tok, synthetic_samples(8, 1, 2, SIZE.image_size))
    train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=2), pad_token_id=0)
    with pytest.raises(FileExistsError, match="--resume auto.*--overwrite"):
        train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=1), pad_token_id=0)
    assert os.path.isdir(tmp_path / "checkpoint-2")  # untouched
    train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=1, overwrite=True), pad_token_id=0)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-1"]
    assert [r["step"] for r in _strict_lines(tmp_path / "log.jsonl")] == [1]
    # a later --resume auto continues THIS run, not the removed one
    out = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=2, resume="auto"), pad_token_id=0)
    assert [h["step"] for h in out["history"]] == [1, 2]
    # resuming another directory's checkpoint into this non-empty one would mix two runs
    train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "other", max_steps=1), pad_token_id=0)
    with pytest.raises(FileExistsError, match="another directory"):
        train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=2, resume=str(tmp_path / "other" / "checkpoint-1")),
              pad_token_id=0)


def test_resume_latest_auto_and_path(tok, tmp_path):
    ds = _ds(tok, synthetic_samples(8, 1, 2, SIZE.image_size))
    with pytest.raises(CheckpointError, match="--resume latest: no checkpoint"):
        train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "a", max_steps=1, resume="latest"), pad_token_id=0)
    out = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "b", max_steps=1, resume="auto"), pad_token_id=0)
    assert out["step"] == 1  # auto with nothing to resume: a fresh start
    out = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "b", max_steps=2, resume="latest"), pad_token_id=0)
    assert out["step"] == 2
    with pytest.raises(CheckpointError, match="no such directory"):
        train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "c", resume=str(tmp_path / "nope")), pad_token_id=0)


def test_resume_refuses_other_architecture_or_data(tok, tmp_path):
    ds = _ds(tok, synthetic_samples(8, 1, 2, SIZE.image_size))
    train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=1), pad_token_id=0)
    causal = build_tiny(tok, SIZE, bidirectional_image=False)
    with pytest.raises(ValueError, match="bidirectional_image: checkpoint True, this run False"):
        train(causal, ds, _cfg(tmp_path, max_steps=2, resume="auto"), pad_token_id=0)
    with pytest.raises(ValueError, match="seed: checkpoint 0, this run 5"):
        train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=2, resume="auto", seed=5), pad_token_id=0)
    with pytest.raises(ValueError, match="data_id"):
        train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=2, resume="auto", data_id="other.json"),
              pad_token_id=0)


def test_cli_resume_checks(tmp_path, capsys):
    from llavit_kernels.train.__main__ import main

    common = ["train", "--tiny", "--stage", "2", "--batch-size", "4", "--num-samples", "8", "--no-progress",
              "--output-dir", str(tmp_path)]
    main(common + ["--max-steps", "1"])
    with pytest.raises(SystemExit) as e:
        main(common + ["--max-steps", "2"])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(common + ["--max-steps", "2", "--resume", "latest", "--no-bidirectional"])
    assert e.value.code == 2 and "bidirectional_image" in capsys.readouterr().err
    first = json.load(open(tmp_path / "log.json"))
    main(common + ["--max-steps", "2", "--resume", "latest"])
    log = json.load(open(tmp_path / "log.json"))
    assert log["step"] == 2 and log["first_loss"] == first["first_loss"]  # the whole run's, not the resumed part's


def test_log_is_trimmed_to_the_resumed_step(tok, tmp_path):
    """kill -9 after step 4 was logged but before checkpoint-4 was complete: the resume from
    checkpoint-2 must not leave steps 3 and 4 in log.jsonl twice."""
    import shutil

    ds = _ds(tok, synthetic_samples(8, 1, 2, SIZE.image_size))
    a = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=4, save_every=2), pad_token_id=0)
    shutil.rmtree(tmp_path / "checkpoint-4")
    b = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=4, resume="auto", plot=True), pad_token_id=0)
    lines = _strict_lines(tmp_path / "log.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["loss"] for r in lines] == [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert os.path.exists(tmp_path / "loss.png")


# ------------------------------------------------------------------------------------ 3. data position
def test_all_bad_micro_batch_keeps_step_count_and_exact_resume(tok, tmp_path):
    """The issue's scenario: batch 1, --max-steps 20, bad samples (so all-bad micro-batches). The run
    must reach step 20 and a resume from a middle checkpoint must replay the same data."""
    good = synthetic_samples(8, 1, 2, SIZE.image_size)
    bad = [{"id": f"bad{i}", "image": "/does/not/exist.png", "conversations": good[0]["conversations"]} for i in range(4)]
    ds = _ds(tok, good + bad)
    straight = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "a", batch_size=1, max_steps=20, save_every=10),
                     pad_token_id=0)
    assert straight["step"] == 20 and straight["samples"] > 20
    skipped_straight = straight["skipped"]["missing_image"]
    assert skipped_straight == straight["samples"] - 20
    resumed = train(build_tiny(tok, SIZE, seed=9), ds, _cfg(tmp_path / "b", batch_size=1, max_steps=20,
                                                            resume=str(tmp_path / "a" / "checkpoint-10")), pad_token_id=0)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["skipped"] == straight["skipped"] and resumed["samples"] == straight["samples"]


def test_data_where_every_record_is_bad_stops_instead_of_looping(tok, tmp_path):
    good = synthetic_samples(4, 1, 2, SIZE.image_size)
    bad = [{"id": i, "image": "/nope.png", "conversations": good[0]["conversations"]} for i in range(6)]
    with pytest.raises(RuntimeError, match=r"no usable micro-batch.*'missing_image': \d+"):
        train(build_tiny(tok, SIZE), _ds(tok, bad), _cfg(tmp_path, max_steps=2, batch_size=2), pad_token_id=0)


def test_sampler_position_is_in_samples():
    a = list(ResumableBatchSampler(10, 3, 0, 0, 30))
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    b = list(ResumableBatchSampler(10, 3, 0, 6, 30))
    assert b == a[2:]
    r0 = list(ResumableBatchSampler(10, 2, 0, 4, 12, rank=0, world=2))
    r1 = list(ResumableBatchSampler(10, 2, 0, 4, 12, rank=1, world=2))
    assert [x + y for x, y in zip(r0, r1)] == [flat[4:8], flat[8:12]]


# ------------------------------------------------------------------------------------ 4. signals and disk
class _SignalAt(SafeDataset):
    def __init__(self, records, proc, at, sig=signal.SIGTERM):
        super().__init__(records, proc)
        self.calls, self.at, self.sig = 0, at, sig

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return super().__getitem__(i)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(tok, tmp_path, sig):
    def unhandled(signum, frame):  # the test process must survive a trainer that does not handle it
        raise RuntimeError("signal not handled by the trainer")

    old = signal.signal(sig, unhandled)
    try:
        recs = synthetic_samples(16, 1, 2, SIZE.image_size)
        straight = train(build_tiny(tok, SIZE), _ds(tok, recs), _cfg(tmp_path / "a", max_steps=5), pad_token_id=0)
        ds = _SignalAt(recs, SampleProcessor(tok, SIZE.image_size, 16, 128), at=10, sig=sig)  # in step 3
        with pytest.raises(TrainingInterrupted) as e:
            train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "b", max_steps=5), pad_token_id=0)
        assert e.value.exit_code == 128 + sig and e.value.checkpoint.endswith("checkpoint-2")
        assert signal.getsignal(sig) is unhandled  # handlers restored
    finally:
        signal.signal(sig, old)
    resumed = train(build_tiny(tok, SIZE), _ds(tok, recs), _cfg(tmp_path / "b", max_steps=5, resume="auto"),
                    pad_token_id=0)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert [r["step"] for r in _strict_lines(tmp_path / "b" / "log.jsonl")] == [1, 2, 3, 4, 5]


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _wait_for_log(path, lines, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and len(open(path).readlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no progress")


def test_cli_sigterm_saves_and_exits_nonzero(tmp_path):
    """SIGTERM to the whole process group (as a scheduler sends it), with a DataLoader worker: the
    worker leaves it to the main process, which checkpoints at the step boundary and exits 143."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llavit_kernels.train", "train", "--tiny", "--stage", "2", "--max-steps", "100000",
           "--batch-size", "2", "--num-samples", "16", "--no-progress", "--num-workers", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_log(out / "log.jsonl", 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ckpt = latest_checkpoint(str(out))
    step = int(ckpt.rsplit("-", 1)[1])
    assert step >= 2 and "stopped by SIGTERM" in err
    blob = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
    assert blob["state"]["step"] == step and blob["state"]["samples"] == 2 * step


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["kill -9 launcher", "SIGTERM one worker"])
def test_workers_stop_and_checkpoint_when_torchrun_is_killed(tmp_path, how):
    """kill -9 of the launcher: torchrun cannot forward anything, so without help its workers keep
    training. With PR_SET_PDEATHSIG they get SIGTERM, checkpoint together at a step boundary and exit.
    SIGTERM to ONE worker: the ranks agree at the step boundary (one all-reduce), so both save."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llavit_kernels.train", "train", "--tiny", "--stage", "2", "--max-steps", "100000",
           "--batch-size", "2", "--num-samples", "16", "--no-progress", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        _wait_for_log(out / "log.jsonl", 2, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        if how == "kill -9 launcher":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.kill(workers[1], signal.SIGTERM)
        proc.wait(timeout=150)
        assert proc.returncode != 0
        t0 = time.time()
        while any(_alive(w) for w in workers) and time.time() - t0 < 120:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers still running after the launcher died"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    ckpt = latest_checkpoint(str(out))
    assert ckpt is not None and _finite_checkpoint(ckpt)
    assert int(ckpt.rsplit("-", 1)[1]) >= 2  # the steps already logged are in it
    assert not [d for d in os.listdir(out) if d.endswith((".tmp", ".old"))]


def test_output_dir_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from llavit_kernels.train import __main__ as cli

    def no_work(*a, **k):
        raise AssertionError("the model was built before the output dir was checked")

    monkeypatch.setattr(cli, "build_model_and_tokenizer", no_work)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--tiny", "--output-dir", str(tmp_path / "file" / "out")])
    assert e.value.code == 2 and "cannot create" in capsys.readouterr().err

    class Usage:
        free = 1000

    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda p: Usage)
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "model.safetensors").write_bytes(b"\0" * 4096)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--init-from", str(tmp_path / "init"), "--output-dir", str(tmp_path / "out2")])
    assert e.value.code == 2 and "GiB free, one checkpoint needs" in capsys.readouterr().err


def test_full_disk_keeps_previous_checkpoint_and_cleans_temp(tok, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            real(*a, **k)  # write part of it, then fail like a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(CheckpointError, match="checkpoint-2.*No space left on device"):
        train(build_tiny(tok, SIZE), _ds(tok, synthetic_samples(8, 1, 2, SIZE.image_size)),
              _cfg(tmp_path, max_steps=4, save_every=1), pad_token_id=0)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "log.jsonl"]  # no .tmp; the emergency save not tried
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    out = train(build_tiny(tok, SIZE), _ds(tok, synthetic_samples(8, 1, 2, SIZE.image_size)),
                _cfg(tmp_path, max_steps=2, resume="auto"), pad_token_id=0)
    assert out["step"] == 2


def test_same_step_resave_is_atomic(tok, tmp_path, monkeypatch):
    model = build_tiny(tok, SIZE)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = str(tmp_path / "checkpoint-3")
    save_checkpoint(path, model, opt, sched, {"step": 3, "tag": "first"})
    real = os.replace
    calls = []

    def dies_after_moving_old_away(src, dst):
        calls.append((src, dst))
        real(src, dst)
        if dst.endswith(".old"):
            raise KeyboardInterrupt  # interrupted between the two renames

    monkeypatch.setattr(trainer.os, "replace", dies_after_moving_old_away)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, sched, {"step": 3, "tag": "second"})
    monkeypatch.setattr(trainer.os, "replace", real)
    # the complete old checkpoint is found again (never a dir without weights)
    assert latest_checkpoint(str(tmp_path)) == path and _finite_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    save_checkpoint(path, model, opt, sched, {"step": 3, "tag": "second"})
    blob = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    assert blob["state"]["tag"] == "second" and sorted(os.listdir(tmp_path)) == ["checkpoint-3"]


def test_save_total_limit(tok, tmp_path):
    train(build_tiny(tok, SIZE), _ds(tok, synthetic_samples(8, 1, 2, SIZE.image_size)),
          _cfg(tmp_path, max_steps=5, save_every=1, save_total_limit=2), pad_token_id=0)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]


# ------------------------------------------------------------------------------------ 8. counts
def test_counts_by_reason_with_workers_and_across_resume(tok, tmp_path):
    good = synthetic_samples(10, 1, 2, SIZE.image_size)
    recs = good + [{"id": "x", "image": "/nope.png", "conversations": good[0]["conversations"]},
                   {"id": "y", "conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt"}]}]
    straight = train(build_tiny(tok, SIZE), _ds(tok, recs), _cfg(tmp_path / "a", max_steps=6, save_every=3,
                                                                   num_workers=1), pad_token_id=0)
    flat = [i for b in ResumableBatchSampler(len(recs), 4, 0, 0, straight["samples"]) for i in b]
    expected = {"missing_image": flat.count(10), "empty_answer": flat.count(11)}
    assert straight["skipped"] == {k: v for k, v in expected.items() if v}
    assert sum(expected.values()) > 0
    resumed = train(build_tiny(tok, SIZE), _ds(tok, recs), _cfg(tmp_path / "b", max_steps=6,
                                                                  resume=str(tmp_path / "a" / "checkpoint-3")),
                    pad_token_id=0)
    assert resumed["skipped"] == straight["skipped"]


# ------------------------------------------------------------------------------------ 9. loading errors
def test_loading_errors_name_the_file(tok, tmp_path, capsys):
    from llavit_kernels.train.__main__ import main

    model = build_tiny(tok, SIZE)
    good = tmp_path / "good"
    model.save_pretrained(str(good))
    trunc = tmp_path / "trunc"
    model.save_pretrained(str(trunc))
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: os.path.getsize(w) // 2])
    with pytest.raises(CheckpointError, match=r"trunc/model.safetensors: not a readable safetensors file, truncated"):
        trainer.check_checkpoint_files(str(trunc))
    badcfg = tmp_path / "badcfg"
    model.save_pretrained(str(badcfg))
    (badcfg / "llavit_config.json").write_text('{"text": {"vocab_size": 12,,}')
    with pytest.raises(SystemExit) as e:
        main(["train", "--init-from", str(badcfg), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "badcfg/llavit_config.json: invalid JSON at line 1 column" in err
    with pytest.raises(CheckpointError, match="trunc/model.safetensors"):
        main(["eval", "--checkpoint", str(trunc), "--num", "2"])


# ------------------------------------------------------------------------------------ 10. token-weighted loss
def test_loss_is_token_weighted_over_the_global_batch(tok, tmp_path):
    """Micro-batches with different answer-token counts: grad-accum 2 x batch 2 must equal batch 4
    (the same reduction that makes DDP / FSDP ranks agree with one process)."""
    recs = synthetic_samples(16, 1, 1, SIZE.image_size)  # captions: answers of different lengths
    ds = _ds(tok, recs)
    lens = [int((ds[i]["labels"] != -100).sum()) for i in range(16)]
    assert len(set(lens)) > 1
    one = build_tiny(tok, SIZE)
    two = build_tiny(tok, SIZE)
    a = train(one, ds, _cfg(tmp_path / "a", stage=1, max_steps=3, batch_size=4), pad_token_id=0)
    b = train(two, ds, _cfg(tmp_path / "b", stage=1, max_steps=3, batch_size=2, grad_accum=2), pad_token_id=0)
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], abs=2e-5)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
