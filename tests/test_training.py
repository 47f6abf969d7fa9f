"""The training pipeline's promises: a deterministic held-out split of the corpus, a tokenizer that covers the
held-out set's 100k tokens and round-trips text, exact resumption, and the distillation loss's definition."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backends.checkpoint import ModelConfig
from harness import corpus, training
from harness.models import EMBEDDED_MODELS
from harness.quality import evaluation_windows

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_position_embeddings=training.CONTEXT)


@pytest.fixture(scope="module")
def documents():
    return corpus.documents()


def test_split_is_by_document_disjoint_and_stable(documents):
    train, heldout = corpus.split(documents)
    assert {d.name for d in train}.isdisjoint(d.name for d in heldout)
    assert len(train) + len(heldout) == len(documents)
    assert any(d.name.startswith("topics/") for d in documents) and any(d.name.startswith("stdlib/") for d in documents)
    assert not any("/test/" in d.name for d in documents)
    # a document's side depends on its name alone (sha256), never on the file system's order
    assert corpus.is_heldout("stdlib/datetime.py") and not corpus.is_heldout("stdlib/json/decoder.py")
    assert corpus.split(list(reversed(documents))) == (train[::-1], heldout[::-1])


def test_committed_tokenizer_covers_the_heldout_set():
    tokenizer = training.load_tokenizer(EMBEDDED_MODELS["default-target"])
    assert tokenizer.get_vocab_size() == training.VOCAB_SIZE
    windows = evaluation_windows(tokenizer, training.CONTEXT)
    assert windows.numel() >= 100_000
    _, heldout = corpus.split(corpus.documents())
    text = heldout[0].text
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level BPE: nothing is lost


def test_distillation_loss_is_kl_from_the_teacher():
    student = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    assert training.distillation_loss(student, student).item() == pytest.approx(0.0, abs=1e-6)
    # a one-hot teacher makes KL(teacher || student) the cross-entropy on the hard label
    labels = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(labels, 64).float() * 1e4
    expected = F.cross_entropy(student.reshape(-1, 64), labels.reshape(-1))
    assert training.distillation_loss(student, one_hot).item() == pytest.approx(expected.item(), rel=1e-5)


def test_resumed_training_reaches_the_same_weights(tmp_path, monkeypatch):
    stream = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(0))
    schedule = training.Schedule(steps=4, batch_size=2, lr=1e-2, warmup=1)
    whole = training.train(TINY, schedule, stream, tmp_path / "whole", save_every=2, log=lambda line: None)

    draws = training.batch_at

    def interrupted_after_two_steps(stream, step, schedule):
        if step == 2:
            raise KeyboardInterrupt
        return draws(stream, step, schedule)

    monkeypatch.setattr(training, "batch_at", interrupted_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        training.train(TINY, schedule, stream, tmp_path / "resumed", save_every=2, log=lambda line: None)
    monkeypatch.setattr(training, "batch_at", draws)
    resumed = training.train(TINY, schedule, stream, tmp_path / "resumed", resume=True, save_every=2,
                             log=lambda line: None)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


# --- the command line: bad input is refused before anything is written ----------------------------------------

TOKENIZER = EMBEDDED_MODELS["default-target"] / training.TOKENIZER_FILE
TINY_CLI = TINY.replace(vocab_size=training.VOCAB_SIZE)  # the committed tokenizer's vocabulary


@pytest.fixture
def tiny_training(tmp_path, monkeypatch):
    """`python -m harness train` in-process on a tiny model, a three-document corpus and a 3-step schedule, run in
    tmp_path (so .cache/train lands there). Returns a target directory holding the committed tokenizer."""
    monkeypatch.chdir(tmp_path)
    schedule = training.Schedule(steps=3, batch_size=2, lr=1e-2, warmup=1)
    for name, value in [("TARGET", TINY_CLI), ("DRAFT", TINY_CLI), ("TARGET_SCHEDULE", schedule),
                        ("DRAFT_SCHEDULE", schedule)]:
        monkeypatch.setattr(training, name, value)
    text = "def increment(x):\n    return x + 1\n" * 100
    monkeypatch.setattr(corpus, "documents", lambda: [corpus.Document(f"stdlib/m{i}.py", text) for i in range(3)])
    target = tmp_path / "target"
    target.mkdir()
    (target / training.TOKENIZER_FILE).write_bytes(TOKENIZER.read_bytes())
    return target


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--steps", "-5"), ("--steps", "ten"),
                                           ("--save-every", "0")])
def test_step_counts_must_be_positive(tiny_training, capsys, option, value):
    before = _files(tiny_training)
    with pytest.raises(SystemExit) as stop:
        training.main_train(["target", "--out", str(tiny_training), option, value])
    error = capsys.readouterr().err.splitlines()[-1]
    assert stop.value.code == 2
    assert f"argument {option}: {value!r} is not a step count; accepted: a positive integer" in error
    assert _files(tiny_training) == before and not (tiny_training.parent / ".cache").exists()


def _one_line_error(capsys, argv) -> str:
    assert training.main_train(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m harness train: error: ") and "Traceback" not in err
    return err


def test_missing_tokenizer_and_teacher_are_one_line_errors(tiny_training, tmp_path, capsys):
    missing = tmp_path / "missing"
    err = _one_line_error(capsys, ["target", "--out", str(missing)])
    assert f"{missing / 'tokenizer.json'}: no such file" in err and f"tokenizer --out {missing}" in err
    err = _one_line_error(capsys, ["draft", "--out", str(tmp_path / "draft"), "--teacher", str(missing)])
    assert f"{missing / 'tokenizer.json'}: no such file; accepted: a --teacher directory" in err
    # a distilling draft needs the teacher's weights too, not only its tokenizer
    err = _one_line_error(capsys, ["draft", "--out", str(tmp_path / "draft"), "--teacher", str(tiny_training)])
    assert f"--teacher: {tiny_training / 'config.json'}: missing" in err
    # a teacher whose next-token distributions are over another vocabulary
    wide = tmp_path / "wide-teacher"
    training.save_model(training.bf16_checkpoint("wide", training.new_model(TINY.replace(vocab_size=8192), 0)),
                        training.load_tokenizer(tiny_training), wide)
    err = _one_line_error(capsys, ["draft", "--out", str(tmp_path / "draft"), "--teacher", str(wide)])
    assert f"--teacher: {wide} has a vocabulary of 8192; accepted: a target of the draft's 4096" in err
    (tiny_training / training.TOKENIZER_FILE).write_text("{not a tokenizer")
    err = _one_line_error(capsys, ["target", "--out", str(tiny_training)])
    assert f"{tiny_training / 'tokenizer.json'}: unreadable tokenizer" in err
    assert not missing.exists() and not (tmp_path / "draft").exists() and not (tmp_path / ".cache").exists()


def test_out_and_work_dir_must_be_directories(tiny_training, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    before = _files(tmp_path)
    for option, value, expected in [("--out", str(a_file), f"{str(a_file)!r} is a file; accepted: a directory"),
                                    ("--work-dir", str(a_file), f"{str(a_file)!r} is a file; accepted: a directory"),
                                    ("--out", "", "'' is empty; accepted: a directory"),
                                    ("--work-dir", "", "'' is empty; accepted: a directory")]:
        with pytest.raises(SystemExit) as stop:
            training.main_train(["target", "--out", str(tiny_training), option, value])
        assert stop.value.code == 2
        assert f"argument {option}: {expected}" in capsys.readouterr().err.splitlines()[-1]
    assert _files(tmp_path) == before


def test_training_state_is_checked_before_anything_is_written(tiny_training, tmp_path, capsys):
    work = tmp_path / "work"
    state = work / training.STATE_FILE
    run = ["target", "--out", str(tiny_training), "--work-dir", str(work)]
    before = _files(tiny_training)
    work.mkdir()
    state.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    err = _one_line_error(capsys, [*run, "--resume"])
    assert f"{state}: not a training state (" in err and "delete it to start over" in err
    # a state this run would overwrite
    err = _one_line_error(capsys, run)
    assert f"{state}: a training state exists, which this run would overwrite; accepted: --resume" in err
    # a real state, of another model
    other = TINY_CLI.replace(d_model=64)
    training.train(other, training.Schedule(steps=1, batch_size=1, lr=1e-2, warmup=1),
                   torch.randint(0, 64, (600,)), work, save_every=1, log=lambda line: None)
    err = _one_line_error(capsys, [*run, "--resume"])
    assert f"{state}: the training state of another model" in err
    # this model's state, further on than the steps asked for
    training.train(TINY_CLI, training.TARGET_SCHEDULE, torch.randint(0, 64, (600,)), work, save_every=1,
                   log=lambda line: None)
    err = _one_line_error(capsys, [*run, "--resume", "--steps", "2"])
    assert f"{state}: the state is at step 3, past the 2 steps asked for; accepted: --steps 3 or more" in err
    assert _files(tiny_training) == before


def test_a_tiny_run_writes_a_loadable_model_and_resumes(tiny_training, capsys):
    from backends.checkpoint import load_checkpoint

    assert training.main_train(["target", "--out", str(tiny_training), "--steps", "2", "--save-every", "1"]) == 0
    assert training.main_train(["target", "--out", str(tiny_training), "--resume"]) == 0  # steps 3 of 3
    assert load_checkpoint(tiny_training).config.d_model == TINY_CLI.d_model
    log = (tiny_training / training.LOG_FILE).read_text()
    assert "step" in log and log.count("python -m harness train target") == 2
    assert not list(tiny_training.glob(".staging-*"))
    state = tiny_training.parent / ".cache" / "train" / "target" / training.STATE_FILE
    assert training.state_step(state, training.new_model(TINY_CLI, 0)) == 3


def test_an_interrupted_save_leaves_the_earlier_model_whole(tiny_training, monkeypatch):
    tokenizer = training.load_tokenizer(tiny_training)
    model = training.new_model(TINY_CLI, 0)
    training.save_model(training.bf16_checkpoint("target", model), tokenizer, tiny_training)
    before = _files(tiny_training)

    def killed(*args):
        raise KeyboardInterrupt

    # the new weights are written, then the run is stopped while the tokenizer files are saved
    monkeypatch.setattr(training, "save_tokenizer_files", killed)
    with pytest.raises(KeyboardInterrupt):
        training.save_model(training.bf16_checkpoint("target", training.new_model(TINY_CLI, 1)), tokenizer,
                            tiny_training)
    assert _files(tiny_training) == before and not list(tiny_training.glob(".staging-*"))


def test_bad_steps_through_python_m_harness(tmp_path):
    run = subprocess.run([sys.executable, "-m", "harness", "train", "target", "--out", str(tmp_path / "m"),
                          "--steps", "-5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "argument --steps: '-5' is not a step count; accepted: a positive integer" in run.stderr.splitlines()[-1]
    assert not (tmp_path / "m").exists()
