"""The training pipeline's promises: a deterministic held-out split of the corpus, a tokenizer that covers the
held-out set's 100k tokens and round-trips text, exact resumption, and the distillation loss's definition."""
import pytest
import torch
import torch.nn.functional as F

from backends.checkpoint import ModelConfig
from harness import corpus, training
from harness.models import EMBEDDED_MODELS
from harness.quality import evaluation_windows

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
