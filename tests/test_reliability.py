"""Runs that survive faults: checkpoints, resume, signals, divergence, bad checkpoints, bad flags.

The resume tests drive ``entropy-collapse train`` in a subprocess, stop it (SIGKILL after a
periodic checkpoint, or SIGINT/SIGTERM), resume it, and require the continued ``metrics.jsonl``
to equal an uninterrupted run's record for record, bit for bit, apart from the two wall-clock
fields ``train_time_s`` and ``tokens_per_s``.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from sigma_core.cli import main
from sigma_core.experiments.config import preset
from sigma_core.experiments.train import (CHECKPOINT_NAME, METRICS_NAME, STUCK_EXIT_S, SUMMARY_NAME, CheckpointError,
                              Diverged,
                              Trainer, atomic_torch_save, read_checkpoint,
                              read_checkpoint_file, truncate_metrics)

STEPS = 40
ARGS = ["--preset", "cpu-smoke", "--steps", str(STEPS), "--checkpoint-every", "10", "--log-every", "5",
        "--threads", "1", "--no-progress"]
TIMING = {"train_time_s", "tokens_per_s"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def comparable(run_dir):
    """The run's records without the wall-clock fields, as canonical JSON lines."""
    lines = (run_dir / METRICS_NAME).read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(line).items() if k not in TIMING}, sort_keys=True)
            for line in lines]


def start(run_dir):
    """``entropy-collapse train --out RUN_DIR`` in a subprocess."""
    return subprocess.Popen([sys.executable, "-m", "sigma_core.cli", "train", "--out", str(run_dir), *ARGS],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, step, proc, timeout=120):
    """Block until ``metrics.jsonl`` holds a record with at least ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / METRICS_NAME
        if path.exists():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]
            if steps and steps[-1] >= step:
                return steps[-1]
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"no record of step {step} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in-process, the same code path as the CLI)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--out", str(run_dir), *ARGS]) == 0
    return run_dir


def test_checkpoints_at_the_interval_and_the_end(tmp_path):
    cfg = preset("cpu-smoke", steps=7, checkpoint_every=3, threads=1, log_every=1)
    trainer = Trainer(cfg, tmp_path)
    written = []
    original = trainer.save_checkpoint
    trainer.save_checkpoint = lambda *a: written.append(trainer.step) or original(*a)
    trainer.run()
    assert written == [3, 6, 7]
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 7
    assert not list(tmp_path.glob(".*tmp*"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    atomic_torch_save({"step": 1}, path)

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint_file(path) == {"step": 1}  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left


def test_resume_after_kill_at_a_checkpoint_is_bit_identical(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(run_dir, 21, proc)  # a record after step 20: its checkpoint is on disk
    proc.kill()
    proc.communicate()
    ckpt_step = read_checkpoint(run_dir / CHECKPOINT_NAME)["step"]
    assert 20 <= ckpt_step < STEPS, "the run was not killed mid-way"
    assert not (run_dir / SUMMARY_NAME).exists()
    res = subprocess.run([sys.executable, "-m", "sigma_core.cli", "train", "--resume", str(run_dir)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert comparable(run_dir) == comparable(reference)
    ours, theirs = (json.loads((d / SUMMARY_NAME).read_text()) for d in (run_dir, reference))
    for key in ("steps", "final_train_loss", "final_val_loss", "entropy_mean", "sigma_max", "diverged"):
        assert ours[key] == theirs[key], key
    ours, theirs = (read_checkpoint(d / CHECKPOINT_NAME)["model"] for d in (run_dir, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_checkpoints_and_says_how_to_resume(sig, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(run_dir, 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"entropy-collapse train --resume {run_dir}" in err and signal.Signals(sig).name in err
    state = read_checkpoint(run_dir / CHECKPOINT_NAME)
    assert 1 <= state["step"] < STEPS
    assert f"after step {state['step']}" in err
    logged = [json.loads(x)["step"] for x in (run_dir / METRICS_NAME).read_text().splitlines()]
    assert logged[-1] <= state["step"]  # every record up to the checkpoint is on disk
    if sig == signal.SIGINT:
        return  # continuing is the same as after SIGTERM (checked there), save the time
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert comparable(run_dir) == comparable(reference)


def test_nonfinite_loss_stops_the_run_keeps_the_last_good_checkpoint_and_marks_divergence(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--out", str(run_dir), "--preset", "cpu-smoke", "--lr", "1e30", "--steps", "20",
                 "--checkpoint-every", "1", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0  # divergence is a result, not a crash
    last = json.loads((run_dir / METRICS_NAME).read_text().splitlines()[-1])
    assert last["diverged"] is True and "non-finite loss" in last["reason"]
    step = last["step"]
    assert f"diverged at step {step}" in err
    summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    assert (summary["diverged"], summary["diverged_step"], summary["steps"]) == (True, step, step - 1)
    state = read_checkpoint(run_dir / CHECKPOINT_NAME)  # the last good one, not the diverged step
    assert state["step"] == step - 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nonfinite_gradient_is_caught_before_the_optimizer_step(tmp_path):
    trainer = Trainer(preset("cpu-smoke", steps=10, threads=1, checkpoint_every=2), tmp_path)
    for _ in range(2):
        trainer.train_step()
    weight = trainer.model.head.weight
    before = weight.detach().clone()
    handle = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(Diverged, match="step 3: non-finite gradient norm"):
        trainer.train_step()
    handle.remove()
    assert torch.equal(weight.detach(), before) and trainer.step == 2
    trainer.model.head.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    summary = trainer.run()
    assert summary["diverged"] and summary["diverged_step"] == 3
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["diverged"] is True


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    cfg = preset("cpu-smoke", steps=4, threads=1)
    good = Trainer(cfg, tmp_path).save_checkpoint()
    blob = good.read_bytes()
    fresh = Trainer(cfg)
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    for name, match in [("truncated.pt", "truncated or corrupted"), ("garbage.pt", "truncated or corrupted"),
                        ("other.pt", "not a training checkpoint"), ("absent.pt", "no checkpoint")]:
        with pytest.raises(CheckpointError, match=match):
            fresh.load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"config differs .*lr: checkpoint 0\.03 vs 0\.001"):
        Trainer(preset("cpu-smoke", steps=4, lr=1e-3)).load_checkpoint(good)
    with pytest.raises(CheckpointError, match="d_model"):
        Trainer(preset("cpu-smoke", steps=4, d_model=64)).load_checkpoint(good)
    # runtime fields may differ: the same trajectory on another thread count or interval
    Trainer(preset("cpu-smoke", steps=4, threads=1, checkpoint_every=2, progress=True)).load_checkpoint(good)


def test_resume_cli_rejects_bad_checkpoints_with_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--preset", "cpu-smoke", "--steps", "2", "--threads", "1",
                 "--no-progress"]) == 0
    blob = (run_dir / CHECKPOINT_NAME).read_bytes()
    (run_dir / CHECKPOINT_NAME).write_bytes(blob[:1000])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(run_dir)])
    assert exc.value.code == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_resume_drops_records_after_the_checkpoint_and_a_half_written_line(tmp_path):
    path = tmp_path / METRICS_NAME
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in (1, 5, 10, 15))
                    + '{"step": 20, "tra')
    assert truncate_metrics(path, 10) == 2  # step 15 and the half-written line
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 5, 10]
    assert truncate_metrics(path, 10) == 0


@pytest.mark.parametrize("argv, says", [
    (["--out", "{tmp}/a", "--steps", "0"], "--steps"),
    (["--out", "{tmp}/a", "--lr", "inf"], "--lr"),
    (["--out", "{tmp}/a", "--lr", "-1"], "--lr"),
    (["--out", "{tmp}/a", "--grad-clip", "nan"], "--grad-clip"),
    (["--out", "{tmp}/a", "--weight-decay", "-0.1"], "--weight-decay"),
    (["--out", "{tmp}/a", "--val-fraction", "1.5"], "--val-fraction"),
    (["--out", "{tmp}/a", "--threads", "-1"], "--threads"),
    (["--out", "{tmp}/a", "--checkpoint-every", "-5"], "--checkpoint-every"),
    (["--out", "{tmp}/a", "--batch-size", "eight"], "--batch-size"),
    (["--out", "{tmp}/a", "--reparam", "weightnorm"], "--reparam"),
    (["--out", "{tmp}/a", "--preset", "tpu"], "--preset"),
    (["--out", "{tmp}/a", "--device", "quantum"], "--device"),
    (["--out", "{tmp}/a", "--d-model", "30", "--n-head", "4"], "--d-model"),
    (["--out", "{tmp}/a", "--sample-steps", "0"], "--sample-steps"),
    (["--out", "{tmp}/a", "--corpus-bytes", "10"], "--corpus-bytes must be at least"),
    (["--out", "{tmp}/a", "--corpus-bytes", "99999999999"], "--corpus-bytes must be at most"),
    (["--out", "{tmp}/a", "--vocab-size", "1"], "--vocab-size"),
    (["--out", "{tmp}/a", "--vocab-size", "10"], "--vocab-size"),
    (["--out", "{tmp}/a", "--seed", str(2**70)], "--seed"),
    (["--out", "{tmp}/user"], "which a run would overwrite"),
    (["--out", "{tmp}/file"], "not a directory"),
    (["--out", "{tmp}/run"], "already holds a run"),
    (["--resume", "{tmp}/a"], "not a directory"),
    (["--resume", "{tmp}"], "no checkpoint.pt"),
    (["--resume", "{tmp}/run", "--lr", "0.1"], "--lr"),
    (["--resume", "{tmp}/run", "--out", "{tmp}/b"], "not allowed with"),
    ([], "one of the arguments --out --resume --restart is required"),
])
def test_every_bad_flag_exits_2_naming_it(argv, says, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / SUMMARY_NAME).write_text("{}")  # a user's own file
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"")
    (tmp_path / "run" / METRICS_NAME).write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["train", *(a.replace("{tmp}", str(tmp_path)) for a in argv)])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_a_flipped_bit_in_a_checkpoint_is_refused_and_named(tmp_path):
    """One flipped bit inside the tensor data (which unpickles fine) fails the sha256 check."""
    cfg = preset("cpu-smoke", steps=4, threads=1)
    good = Trainer(cfg, tmp_path).save_checkpoint()
    blob = bytearray(good.read_bytes())
    fresh = Trainer(cfg)
    for pos in (len(blob) // 3, len(blob) // 2, len(blob) - 5000):
        bad = tmp_path / f"flip{pos}.pt"
        flipped = bytearray(blob)
        flipped[pos] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"{bad.name} is truncated or corrupted: .*sha256"):
            fresh.load_checkpoint(bad)
    fresh.load_checkpoint(good)  # the unchanged file still loads


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_cannot_run_code(tmp_path):
    """A pickle payload with a valid checksum (anyone can recompute one) is still refused,
    and its command never runs; so is one in the old plain torch.save format."""
    from sigma_core.experiments.train import checkpoint_bytes

    cfg = preset("cpu-smoke", steps=4, threads=1)
    state = Trainer(cfg).state_dict()
    marker = tmp_path / "ran"
    state["extra"] = _Payload(marker)
    (tmp_path / "evil.pt").write_bytes(checkpoint_bytes(state))
    torch.save(state, tmp_path / "evil-legacy.pt")
    for name in ("evil.pt", "evil-legacy.pt"):
        with pytest.raises(CheckpointError, match="could run code"):
            read_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_checkpoints_of_the_format_before_the_checksum_still_load(tmp_path):
    cfg = preset("cpu-smoke", steps=4, threads=1)
    trainer = Trainer(cfg)
    torch.save(trainer.state_dict(), tmp_path / "old.pt")
    state = read_checkpoint(tmp_path / "old.pt")
    assert torch.equal(state["model"]["head.weight"], trainer.model.state_dict()["head.weight"])


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    """A ``.checkpoint.pt.tmpPID`` of a process that no longer exists is removed at the next write;
    a live writer's is left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".{CHECKPOINT_NAME}.tmp{dead}"
    live = tmp_path / f".{CHECKPOINT_NAME}.tmp{os.getppid()}"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    atomic_torch_save({"step": 1}, tmp_path / CHECKPOINT_NAME)
    assert not stale.exists() and live.exists()
    assert read_checkpoint_file(tmp_path / CHECKPOINT_NAME) == {"step": 1}


def _short_run(run_dir, *extra):
    assert main(["train", "--out", str(run_dir), "--preset", "cpu-smoke", "--steps", "4", "--threads", "1",
                 "--log-every", "1", "--checkpoint-every", "2", "--no-progress", *extra]) == 0


def test_a_checkpoint_of_another_run_never_resumes_into_a_folder(tmp_path, capsys):
    """An lr 0.01 checkpoint copied into an lr 0.03 run's folder is refused, naming the field,
    and the folder is left byte for byte as it was."""
    a, b = tmp_path / "a", tmp_path / "b"
    _short_run(a)
    _short_run(b, "--lr", "0.01")
    (a / CHECKPOINT_NAME).write_bytes((b / CHECKPOINT_NAME).read_bytes())
    before = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(a)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does not belong to the run in this folder" in err and "lr: checkpoint 0.01 vs config.json 0.03" in err
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()} == before


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    _short_run(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    summary = json.loads((run / SUMMARY_NAME).read_text())
    assert summary["final_val_loss"] is not None and summary["entropy_min_head"] is not None
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "is a finished run (4 of 4 steps); nothing changed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_run_stopped_before_its_first_checkpoint_can_be_restarted(tmp_path, capsys):
    run, reference = tmp_path / "run", tmp_path / "reference"
    _short_run(reference)
    _short_run(run)
    (run / CHECKPOINT_NAME).unlink()  # as if killed before the first checkpoint
    (run / SUMMARY_NAME).unlink()
    for argv, says in ((["--resume", str(run)], f"start it again with --restart {run}"),
                       (["--out", str(run)], f"start it again with --restart {run}"),
                       (["--restart", str(reference)], f"continue it with --resume {reference}"),
                       (["--restart", str(tmp_path)], "holds no config.json")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["train", *argv])
        assert exc.value.code == 2 and says in capsys.readouterr().err
    assert main(["train", "--restart", str(run), "--no-progress"]) == 0
    assert comparable(run) == comparable(reference)


def test_out_empty_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "", "--preset", "cpu-smoke"])
    assert exc.value.code == 2 and "current directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [METRICS_NAME, "samples", SUMMARY_NAME])
def test_no_write_follows_a_link_out_of_the_run_folder(tmp_path, capsys, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "victim"
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target if name != "samples" else outside)  # dangling, or a folder outside
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(run), "--preset", "cpu-smoke", "--steps", "2", "--threads", "1",
              "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and ("is a symbolic link" in err or "which a run would overwrite" in err)
    assert list(outside.iterdir()) == []


def test_report_refuses_to_write_through_a_link_and_reads_bad_files_cleanly(tmp_path, capsys):
    run = tmp_path / "run"
    _short_run(run)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"mine")
    (run / "loss.png").symlink_to(outside)
    with pytest.raises(SystemExit) as exc:
        main(["report", str(run)])
    assert exc.value.code == 2 and "is a symbolic link" in capsys.readouterr().err
    assert outside.read_bytes() == b"mine"
    (run / "loss.png").unlink()
    with open(run / METRICS_NAME, "a") as fh:
        fh.write("[1, 2]\n")
    with pytest.warns(UserWarning, match="not a record"):
        assert main(["report", str(run)]) == 0
    sample = sorted((run / "samples").glob("*.npz"))[-1]
    sample.write_bytes(sample.read_bytes()[:100])
    with pytest.raises(SystemExit) as exc:
        main(["report", str(run)])
    assert exc.value.code == 2 and "truncated or corrupted" in capsys.readouterr().err


def test_a_run_folder_is_cleared_only_of_what_a_run_wrote(tmp_path):
    from sigma_core.experiments.train import RunFolderError, clear_run_dir

    run = tmp_path / "run"
    _short_run(run)
    mine = run / "notes.txt"
    mine.write_text("my notes")
    (run / "samples" / "keep.npz").write_bytes(b"mine")
    with pytest.raises(RunFolderError, match="did not write"):
        clear_run_dir(run)
    assert mine.read_text() == "my notes" and (run / METRICS_NAME).exists()  # nothing deleted
    mine.unlink()
    (run / "samples" / "keep.npz").unlink()
    clear_run_dir(run)
    assert list(run.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: room for a run's config and first records, not for its checkpoint."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_one_line_and_no_traceback(full_disk):
    res = subprocess.run([sys.executable, "-m", "sigma_core.cli", "train", "--out", str(full_disk / "run"),
                          "--preset", "cpu-smoke", "--steps", "2", "--threads", "1", "--no-progress"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "cannot write the run folder" in res.stderr and "No space left on device" in res.stderr
    assert not (full_disk / "run" / CHECKPOINT_NAME).exists()
    assert not list((full_disk / "run").glob(".checkpoint.pt.tmp*"))  # the half-written file is removed


def test_the_monitor_on_a_full_disk_never_fails_the_forward_nor_leaves_half_a_line(full_disk):
    """EntropyMonitor(path=...) on a real 64 KiB tmpfs filled up: every forward returns its
    output, the failure is one RuntimeWarning, the file holds only whole JSON lines, close()
    does not raise, and once space is freed the records are written again."""
    from torch import nn

    from sigma_core.monitor import EntropyMonitor

    filler = full_disk / "filler"
    filler.write_bytes(b"\0" * 40 * 1024)  # leaves room for a few dozen records only
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
    x = torch.randn(2, 5, 8)
    log = full_disk / "entropy.jsonl"
    monitor = EntropyMonitor(layer, path=log)
    with pytest.warns(RuntimeWarning, match="No space left on device") as caught:
        for _ in range(200):
            assert layer(x).shape == x.shape
    assert sum("No space left" in str(w.message) for w in caught) == 1  # once, not 200 times
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) > 10  # ends with a newline: no half-written line
    steps = [json.loads(line)["step"] for line in lines[:-1]]
    assert steps == sorted(steps) and len(steps) % 2 == 0  # whole forwards (2 heads each)
    filler.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
        monitor.close()  # no OSError (nothing is left unflushed)
    after = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(after) == len(steps) + 2 and after[-1]["step"] == 200


def _wait_for_checkpoint(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def test_a_signal_during_a_long_step_ends_the_run_within_seconds_keeping_the_checkpoint(tmp_path):
    """Steps of one sequence of 16 000 tokens (each many seconds, mostly inside one attention
    operation that no Python handler interrupts): SIGTERM during step 2 or later ends the run
    within seconds, not after the step, with exit 143, saying which checkpoint is intact; that
    checkpoint is the last one written, whole, and nothing after it was written.
    (`--block-size 100000` was ignored for 19 minutes before.)"""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigma_core.cli", "train", "--out", str(run), "--preset", "cpu-smoke",
         "--block-size", "16000", "--batch-size", "1", "--steps", "6", "--checkpoint-every", "1",
         "--log-every", "100", "--threads", "1", "--no-progress", "--stop-timeout", "0.5"],
        env={**ENV, "SIGMA_CORE_NATIVE": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(run / CHECKPOINT_NAME, proc)
        step_before = read_checkpoint(run / CHECKPOINT_NAME)["step"]
        time.sleep(0.5)  # inside the next step
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        proc.kill()
    state = read_checkpoint(run / CHECKPOINT_NAME)  # whole: its sha256 matches
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "abandoned" in err
    assert f"the checkpoint of step {state['step']}" in err and f"--resume {run}" in err
    assert state["step"] in (step_before, step_before + 1) and state["step"] < 6
    per_step = state["train_time"] / state["step"]  # the run's own clock
    assert took < min(8.0, per_step), f"the run took {took:.1f} s to stop, a step {per_step:.1f} s"
    assert not (run / SUMMARY_NAME).exists() and not list(run.glob(".*.tmp*"))


def test_a_signal_ends_the_wait_for_another_process_building_the_kernel(tmp_path, monkeypatch):
    """While another process holds the kernel's build lock, the run's first recorded step waits
    for it (up to BUILD_WAIT_SECONDS = 120 s); SIGTERM ends that wait within seconds: exit 143,
    one message offering --restart (no checkpoint yet), no traceback, the other build untouched."""
    from sigma_core import native

    ext = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    name = native._name(native._capability())
    d = native._build_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    code = (f"import fcntl, time; fh = open({str(d.parent / f'.{name}.flock')!r}, 'w'); "
            "fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    proc = None
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sigma_core.cli", "train", "--out", str(run), "--preset", "cpu-smoke",
             "--steps", "4", "--threads", "1", "--no-progress", "--stop-timeout", "1"],
            env={**ENV, "TORCH_EXTENSIONS_DIR": str(ext), "SIGMA_CORE_NATIVE": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:  # the warning before the wait
            seen.append(line)
            if "building the compiled entropy kernel" in line:
                break
        else:
            raise AssertionError(f"no build announced: {seen} {proc.communicate()}")
        time.sleep(1.0)  # waiting on the lock now
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=100)  # the lock wait alone would last 120 s
        took = time.monotonic() - signalled
        assert holder.poll() is None  # the other build goes on
    finally:
        holder.kill()
        holder.wait()
        if proc is not None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took < 20, f"the wait outlived the signal by {took:.1f} s"
    assert "Traceback" not in err and "during step 1, which was abandoned" in err
    assert f"--restart {run}" in err and not (run / CHECKPOINT_NAME).exists()



def test_block_size_100000_is_refused_up_front_naming_the_flag(tmp_path, capsys):
    """The issue's `--block-size 100000` ran 19 minutes, deaf to SIGTERM, then ran out of memory:
    its recorded steps form a 1 x 2 x 100000^2 float32 attention map (80 GB).  Now one line
    naming the flag, exit 2, nothing written; a size that fits still runs."""
    from sigma_core.experiments.train import TooLargeError, check_fits_in_memory

    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), "--preset", "cpu-smoke", "--block-size", "100000",
              "--batch-size", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--block-size (100000) is too large for this machine" in err
    assert "74.5 GiB" in err and not (tmp_path / "run").exists()  # 4 * 2 * 1e10 bytes
    cfg = preset("cpu-smoke", block_size=1024, batch_size=2)  # 2 x 2 x 1024^2 x 4 = 16 MiB exactly
    check_fits_in_memory(cfg, memory=16 * 2**20)
    with pytest.raises(TooLargeError, match="block_size"):
        check_fits_in_memory(cfg, memory=16 * 2**20 - 1)


STUCK_SCRIPT = """
import sys, torch
from sigma_core.experiments.config import preset
from sigma_core.experiments.train import Trainer
torch.set_num_threads(1)
trainer = Trainer(preset("cpu-smoke", steps=6, checkpoint_every=1, log_every=100, threads=1, progress=False),
                  sys.argv[1])
trainer.stop_timeout, trainer.exit_when_stuck = 0.5, True  # as the CLI sets them
a = torch.randn(8000, 8000)
step = trainer.train_step
def train_step(**kw):
    if trainer.step == 2:
        print("long", flush=True)
        a @ a  # one operation of 1e12 flops: tens of seconds, deaf to Python signal handlers
    return step(**kw)
trainer.train_step = train_step
trainer.run()
"""


def test_sigterm_during_one_long_operation_ends_the_process_within_seconds(tmp_path):
    """A step stuck in one long C++ operation (a real 8000 x 8000 matmul on one thread inside step
    3): SIGTERM ends the process within seconds all the same (exit 143), saying the step is stuck
    and that the checkpoint of step 2 is intact, which it is."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_SCRIPT, str(run)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "long", proc.communicate()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the run ignored SIGTERM for 60 s") from None
        took = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took < 0.5 + STUCK_EXIT_S + 5, f"{took:.1f} s"
    assert "Traceback" not in err and "step 3 is stuck in one operation" in err, err
    assert f"the checkpoint of step 2 in {run / CHECKPOINT_NAME} is intact" in err
    assert read_checkpoint(run / CHECKPOINT_NAME)["step"] == 2 and not (run / SUMMARY_NAME).exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system (a tmpfs mounted ro: root ignores permission bits)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("command", ["report", "compare", "demo"])
def test_out_on_a_file_a_dangling_link_or_a_read_only_folder_is_one_line(command, tmp_path, read_only_folder,
                                                                          capsys):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_NAME).write_text("")
    for out, says in ((tmp_path / "file", "exists and is not a directory"),
                      (tmp_path / "dangling", "which does not exist"),
                      (read_only_folder, "is not writable"), (read_only_folder / "sub", "is not writable"),
                      ("", "current directory")):
        with pytest.raises(SystemExit) as exc:
            main([command, *([str(run)] if command == "report" else []), "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and says in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 2  # the error and the pointer to --help
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "nowhere").exists()


def test_a_full_disk_during_compare_is_no_result(full_disk):
    res = subprocess.run([sys.executable, "-m", "sigma_core.cli", "compare", "--out", str(full_disk / "cmp"),
                          "--preset", "cpu-smoke", "--methods", "baseline", "--lrs", "0.03", "--steps", "2"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "No space left on device" in res.stderr
    assert "diverged yes" not in res.stdout + res.stderr and not (full_disk / "cmp" / "compare.md").exists()


def test_a_signal_between_steps_times_the_step_that_begins_next():
    """SIGTERM before the first step (or while a checkpoint is written) reaches the watchdog when no
    step runs; the step that begins next is then the one abandoned after ``stop_timeout``, not run
    for as long as it takes (before: the watchdog gave up on that signal)."""
    import threading

    from sigma_core.experiments.train import _StepAborted

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    trainer = Trainer(preset("cpu-smoke", steps=2, threads=1))
    trainer.stop_timeout = 0.5
    trainer._stop_signal = None
    old = trainer._install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # no step runs: the handler only sets the flag
        time.sleep(0.3)
        assert trainer._stop_signal == signal.SIGTERM
        trainer._enter_step(1)
        start = time.monotonic()
        with pytest.raises(_StepAborted):
            while time.monotonic() - start < 10:  # a step that would run for 10 s
                time.sleep(0.01)
        assert time.monotonic() - start < 5
    finally:
        trainer._leave_step()
        Trainer._restore_signal_handlers(old)
