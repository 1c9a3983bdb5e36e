"""A run folder has one writer, and damage to it is survived or named in one line (issue 28)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from fedmml.cli import main
from fedmml.federation import checkpoint
from fedmml.runs import OWNER, missed_rounds, read_metrics


def _data(root: Path) -> list[str]:
    return ["--set", f'data.root="{root}"', "--set", "run.threads=1"]


def _start(out: Path, emoji_root: Path) -> subprocess.Popen:
    """A tiny run in its own process (and process group), once it holds its folder's lock."""
    cmd = [sys.executable, "-m", "fedmml.cli", "run", "--preset", "tiny", "--quiet", "--out", str(out)]
    proc = subprocess.Popen([*cmd, *_data(emoji_root)], start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / OWNER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / OWNER).exists(), "the run never took its folder"
    # Paused while it holds the lock: the test, not the machine's speed, decides when it goes on.
    os.killpg(proc.pid, signal.SIGSTOP)
    return proc


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(emoji_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    proc = _start(out, emoji_root)
    try:
        again = ["run", "--preset", "tiny", "--quiet", "--out", str(out), "--overwrite", *_data(emoji_root)]
        assert main(again) == 2
        assert main(["run", "--resume", str(out), "--quiet"]) == 2
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count(f"is being written by process {proc.pid}") == 2 and "Traceback" not in err
    assert proc.wait(timeout=300) == 0
    # The first run's folder is whole: one seed's rounds, each once.
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["seed"] == 0


@pytest.mark.slow
def test_a_killed_writer_leaves_its_folder_free(emoji_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out, emoji_root)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (
        main(["run", "--preset", "tiny", "--quiet", "--out", str(out), "--overwrite", *_data(emoji_root)])
        == 0
    )


@pytest.mark.slow
def test_an_interrupt_names_the_folder_to_resume(emoji_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmml.cli", "run", "--preset", "tiny", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, *_data(emoji_root)], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while not (out / OWNER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)  # delivered when it goes on: it cannot finish first
    os.killpg(proc.pid, signal.SIGCONT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130
    assert f"fedmml run --resume {out}" in " ".join(output.split())


class _Finalizer:
    def __del__(self) -> None:
        # The handler runs inside the finalizer, so Python prints "Exception ignored" and goes on, as when a
        # Ctrl-C lands while the garbage collector runs one.
        signal.raise_signal(signal.SIGINT)


def test_an_interrupt_lost_in_a_finalizer_still_stops_the_run(
    emoji_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import fedmml.experiment

    real = fedmml.experiment.build_setup

    def interrupted(*args, **kwargs):
        _Finalizer()
        return real(*args, **kwargs)

    monkeypatch.setattr(fedmml.experiment, "build_setup", interrupted)
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_type))
    out = tmp_path / "run"
    # Python's default handler, or SIG_IGN where the suite runs as a shell's background job.
    before = signal.getsignal(signal.SIGINT)
    assert main(["run", "--preset", "tiny", "--quiet", "--out", str(out), *_data(emoji_root)]) == 130
    assert swallowed == [KeyboardInterrupt]
    assert f"fedmml run --resume {out}" in " ".join(capsys.readouterr().err.split())
    assert not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) == before  # given back


def test_a_flower_run_that_lost_an_interrupt_stops_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmml import interrupts
    from fedmml.engines.flower import control

    polls = []
    monkeypatch.setattr(control, "run_info", lambda *args: polls.append(1) or {"status": "running"})
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    with interrupts.handled():
        _Finalizer()  # swallowed
        with pytest.raises(KeyboardInterrupt):
            control.wait_for_run(1, "local", {}, timeout=60, poll=0.01)
    assert polls == []


@pytest.fixture(scope="module")
def finished(emoji_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LW run over three stages with every round's checkpoint kept."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = ["run", "--preset", "tiny", "--method", "lw", "--quiet", "--out", str(out), *_data(emoji_root)]
    assert (
        main([*args, "--set", "run.keep_checkpoints=0", "--set", "schedules.uniform.rounds=[1, 2, 2]"]) == 0
    )
    return out


def _stable(run: Path) -> list[dict]:
    times = ("wall_s", "client_s", "eval_s", "client_train_s", "client_data_wait_s")
    return [{k: v for k, v in r.items() if k not in times} for r in read_metrics(run)]


def test_a_torn_newest_checkpoint_is_passed_over(finished: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    newest = run / "checkpoints" / "round-000005.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash or a full disk
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "passed over a damaged checkpoint: round-000005.safetensors cannot be read" in err
    assert "continuing from round-000004.safetensors" in err
    assert _stable(run) == _stable(finished)


def test_every_checkpoint_torn_is_one_line(finished: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(b"")
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "can be read" in err and "Traceback" not in err


def test_resuming_a_finished_run_changes_nothing(finished: Path, capsys) -> None:
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    assert main(["run", "--resume", str(finished), "--quiet"]) == 0
    assert "holds a finished run: nothing to continue" in " ".join(capsys.readouterr().err.split())
    assert {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "extra", [["--set", "eval.every=2"], ["--preset", "emoji"], ["--method", "e2e"], ["--out", "elsewhere"]]
)
def test_resume_takes_no_option_that_would_change_the_run(finished: Path, capsys, extra: list[str]) -> None:
    assert main(["run", "--resume", str(finished), "--quiet", *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{extra[0]} cannot change it" in err and "Traceback" not in err


def test_a_run_that_never_got_going_is_not_a_run_to_protect(emoji_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    base = ["run", "--preset", "tiny", "--quiet", "--out", str(out), "--set", "run.threads=1"]
    # Its set-up fails (no data there) after config.json is written.
    assert main([*base, "--set", f'data.root="{tmp_path / "nothing"}"']) == 2
    assert (out / "config.json").exists() and not (out / "checkpoints").exists()
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "run the same command again, without --resume" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--set", f'data.root="{emoji_root}"']) == 0  # no --overwrite needed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "model.temperature=0.0"], "model.temperature must be > 0"),
        (["--set", "schedules.uniform.lr.heads=[-1e-3, 1e-3, 1e-3]"], "lr.heads must be finite and >= 0"),
        (["--set", "schedules.uniform.lr.image=[nan, 1e-3, 1e-3]"], "lr.image must be finite and >= 0"),
        (["--set", "federation.batch_size=100"], "federation.batch_size = 100 is more than any client holds"),
    ],
)
def test_settings_that_cannot_train_are_one_line_errors(
    emoji_root: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    args = ["run", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "run"), *_data(emoji_root)]
    assert main([*args, *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(emoji_root: Path, tmp_path: Path, capsys) -> None:
    args = ["run", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "run"), *_data(emoji_root)]
    assert main([*args, "--set", 'run.device="cuda"']) == 2
    assert "PyTorch sees no CUDA device" in " ".join(capsys.readouterr().err.split())


def test_a_full_disk_names_the_last_good_checkpoint(
    emoji_root: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = checkpoint.save_file
    calls = []

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--quiet", "--out", str(out), *_data(emoji_root)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot write the checkpoint of round 2" in err and "No space left on device" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'round-000001.safetensors'}" in err
    assert "Traceback" not in err and not list((out / "checkpoints").glob("*.tmp"))


def test_evaluate_names_a_damaged_model_and_a_folder_of_another_task(
    finished: Path, emoji_root: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    other = tmp_path / "sounds"
    (other / "test" / "vision").mkdir(parents=True)
    assert main(["evaluate", "--run", str(run), "--data", str(other)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds image-audio data" in err and "is an image-text model" in err
    model = run / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    assert main(["evaluate", "--run", str(run), "--data", str(emoji_root)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.safetensors cannot be read" in err and "Traceback" not in err


def test_a_resume_on_changed_data_is_refused_unless_asked(emoji_root: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "emoji"
    shutil.copytree(emoji_root, data, ignore=shutil.ignore_patterns(".fedmml-store"))
    run = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--method", "lw", "--quiet", "--out", str(run), *_data(data)]
    assert main([*args, "--set", "run.keep_checkpoints=0"]) == 0
    (run / "summary.json").unlink()
    for late in (2, 3):
        (run / "checkpoints" / f"round-{late:06d}.safetensors").unlink()
    captions = data / "captions_train.json"
    edited = json.loads(captions.read_text())
    for note in edited["annotations"]:
        note["caption"] += " again"
    captions.write_text(json.dumps(edited))
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the training data of clients [0, 1, 2] changed since the run started" in err
    assert main(["run", "--resume", str(run), "--quiet", "--allow-data-change"]) == 0
    assert "going on with changed training data on clients [0, 1, 2]" in " ".join(
        capsys.readouterr().err.split()
    )
    assert read_metrics(run)[1]["data_changed_clients"] == [0, 1, 2]


def test_missed_and_rejoined_rounds_per_client() -> None:
    metrics = [
        {"round": 1, "clients": [0, 2], "failed_clients": [1]},
        {"round": 2, "clients": [0], "failed_clients": [1, 2]},
        {"round": 3, "clients": [0, 1, 2], "failed_clients": []},
    ]
    assert missed_rounds(metrics) == {
        "1": {"missed": [1, 2], "rejoined": [3]},
        "2": {"missed": [2], "rejoined": [3]},
    }
