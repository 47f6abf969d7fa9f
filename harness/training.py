"""Training the embedded default models: a BPE tokenizer, a target model, and drafts for it.

    python -m harness train tokenizer --out models/default-target
    python -m harness train target    --out models/default-target
    python -m harness train draft     --out models/default-draft --teacher models/default-target
    python -m harness train draft     --out runs/draft-hard --teacher models/default-target --no-distill

Everything is seeded and the step counts are fixed, so a run is reproducible on the same Python
(the corpus is its standard library) and torch. Training state is written every `--save-every`
steps to `.cache/train/<out name>/train-state.safetensors` (safetensors, never a pickle); `--resume` continues from it
and reaches the same weights as an uninterrupted run, because batch k is drawn from seed + k. A run without
`--resume` refuses to overwrite a state, and every input is checked before anything is written; the model's
files are replaced whole (written aside, then renamed), so an interrupted run never leaves half a model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from backends.checkpoint import Checkpoint, CheckpointError, ModelConfig, check_tokenizer, load_checkpoint
from backends.torch_ref.backend import build_model
from backends.torch_ref.model import Transformer, full_sequence_context
from harness import corpus

VOCAB_SIZE = 4096
CONTEXT = 256  # training window; also the models' max_position_embeddings
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "train-state.safetensors"
LOG_FILE = "training.log"


class TrainingError(ValueError):
    """A tokenizer, teacher or training state training cannot use; the message names it and what is accepted."""


# ~12M parameters: Llama-style (RMSNorm, RoPE, GQA 6 query heads over 2 KV heads, SwiGLU)
TARGET = ModelConfig(vocab_size=VOCAB_SIZE, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024,
                     max_position_embeddings=CONTEXT)
# ~2.4M parameters, embeddings tied: small enough that a draft step costs a fraction of a target step
DRAFT = ModelConfig(vocab_size=VOCAB_SIZE, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
                    max_position_embeddings=CONTEXT, tie_embeddings=True)


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int  # sequences of CONTEXT + 1 tokens per step
    lr: float
    warmup: int
    weight_decay: float = 0.1
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


TARGET_SCHEDULE = Schedule(steps=800, batch_size=16, lr=2e-3, warmup=30)
DRAFT_SCHEDULE = Schedule(steps=500, batch_size=16, lr=3e-3, warmup=40)


# --- the tokenizer -------------------------------------------------------------------------------


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (GPT-2's pre-tokenizer: every byte sequence is representable) on the train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[corpus.EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train, _ = corpus.split(corpus.documents())
    tokenizer.train_from_iterator((doc.text for doc in train), trainer=trainer)
    return tokenizer


def load_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE))


def encode(tokenizer, docs: list[corpus.Document]) -> torch.Tensor:
    """One int64 stream: each document's tokens followed by the EOS token."""
    eos = tokenizer.token_to_id(corpus.EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([doc.text for doc in docs]):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@contextmanager
def replacing_files(directory: Path):
    """Yield a staging directory inside `directory`; on success, move each file written there over its namesake.
    A save that fails or is killed part-way leaves every earlier file whole (each rename is atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        yield staging
        for file in staging.iterdir():
            os.replace(file, directory / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_tokenizer_files(tokenizer, directory: Path) -> None:
    """tokenizer.json plus the small files transformers' AutoTokenizer reads beside it."""
    tokenizer.save(str(directory / TOKENIZER_FILE))
    eos_id = tokenizer.token_to_id(corpus.EOS)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": corpus.EOS, "eos_token": corpus.EOS,
         "unk_token": None, "model_max_length": CONTEXT}, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}, indent=2) + "\n")


# --- training ------------------------------------------------------------------------------------


def batch_at(stream: torch.Tensor, step: int, schedule: Schedule) -> torch.Tensor:
    """(batch_size, CONTEXT + 1) windows at offsets drawn from seed + step: any step can be redrawn on resume."""
    generator = torch.Generator().manual_seed(schedule.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - CONTEXT - 1, (schedule.batch_size,), generator=generator)
    return torch.stack([stream[s : s + CONTEXT + 1] for s in starts.tolist()])


def forward_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, full_sequence_context(positions, torch.ones_like(tokens, dtype=torch.bool)))


def new_model(config: ModelConfig, seed: int) -> Transformer:
    """GPT-2-style initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            continue  # norm weights stay 1
        std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        torch.nn.init.normal_(param, std=std)
    return model


def _optimizer(model: Transformer, schedule: Schedule) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=schedule.lr, betas=(0.9, 0.95))


def _state_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Every tensor _save_state writes for `model`, with its shape."""
    shapes = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()
              if k != "lm_head.weight" or not model.config.tie_embeddings}
    for name, param in model.named_parameters():
        shapes |= {f"optim.{name}.exp_avg": tuple(param.shape), f"optim.{name}.exp_avg_sq": tuple(param.shape),
                   f"optim.{name}.step": (1,)}
    return shapes


def state_step(path: Path, model: Transformer) -> int:
    """The step a saved training state reached, once its tensors are checked to be `model`'s and its optimizer's."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            step = (handle.metadata() or {}).get("step", "")
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise TrainingError(f"{path}: not a training state ({str(error).splitlines()[0]}); accepted: a "
                            f"{STATE_FILE} that training wrote, or delete it to start over") from None
    if shapes != _state_shapes(model) or not step.isdigit():
        raise TrainingError(f"{path}: the training state of another model (its tensors or step differ from this "
                            "model's); accepted: a state of the same model, or delete it to start over")
    return int(step)


def _save_state(path: Path, model: Transformer, optimizer: torch.optim.AdamW, step: int) -> None:
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_embeddings}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"optim.{names[id(param)]}.{key}"] = value.reshape(param.shape) if key != "step" else value.reshape(1)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)  # never leave a half-written state behind


def _load_state(path: Path, model: Transformer, optimizer: torch.optim.AdamW) -> int:
    step = state_step(path, model)
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    for name, param in model.named_parameters():
        if f"optim.{name}.exp_avg" in tensors:
            optimizer.state[param] = {key: tensors[f"optim.{name}.{key}"].reshape(() if key == "step" else param.shape)
                                      for key in ("step", "exp_avg", "exp_avg_sq")}
    return step


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on next-token distributions (soft labels, temperature 1)."""
    soft = F.log_softmax(teacher_logits, dim=-1)
    return F.kl_div(F.log_softmax(student_logits, dim=-1), soft, log_target=True, reduction="none").sum(-1).mean()


def train(
    config: ModelConfig,
    schedule: Schedule,
    stream: torch.Tensor,
    work_dir: Path,
    teacher: Transformer | None = None,
    resume: bool = False,
    save_every: int = 100,
    log=print,
) -> Transformer:
    """Next-token training on `stream`; with a teacher, the loss is the KL divergence from the teacher's
    next-token distribution (logit distillation with soft labels, temperature 1; Hinton et al. 2015)."""
    torch.manual_seed(schedule.seed)
    model = new_model(config, schedule.seed)
    optimizer = _optimizer(model, schedule)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / STATE_FILE
    start = _load_state(state_path, model, optimizer) if resume and state_path.exists() else 0
    if resume and not start:
        log(f"no training state at {state_path}: starting at step 0")
    model.train()
    began = time.perf_counter()
    for step in range(start, schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        batch = batch_at(stream, step, schedule)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = forward_logits(model, inputs).float()
        if teacher is None:
            loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))
        else:
            with torch.no_grad():
                teacher_logits = forward_logits(teacher, inputs).float()
            loss = distillation_loss(logits, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 10 == 0:
            log(f"step {step + 1}/{schedule.steps} loss {loss.item():.4f} lr {schedule.lr_at(step):.2e} "
                f"{time.perf_counter() - began:.0f}s")
        if (step + 1) % save_every == 0 or step + 1 == schedule.steps:
            _save_state(state_path, model, optimizer, step + 1)
    return model.eval()


def bf16_checkpoint(name: str, model: Transformer) -> Checkpoint:
    return Checkpoint(name, model.config, {k: v.to(torch.bfloat16) for k, v in model.export_weights().items()})


def save_model(checkpoint: Checkpoint, tokenizer, directory: Path) -> None:
    """A Hugging Face-format directory: config.json (bf16), model.safetensors, tokenizer and generation config."""
    with replacing_files(directory) as staging:
        checkpoint.save(staging)
        config_file = staging / "config.json"
        hf = json.loads(config_file.read_text())
        hf["torch_dtype"] = "bfloat16"
        eos_id = tokenizer.token_to_id(corpus.EOS)
        hf.update(bos_token_id=eos_id, eos_token_id=eos_id)
        config_file.write_text(json.dumps(hf, indent=2) + "\n")
        save_tokenizer_files(tokenizer, staging)


# --- the command line ----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count; accepted: a positive integer")
    return int(text)


def _directory(text: str) -> Path:
    path = Path(text)
    if not text:  # Path("") would be the current directory
        raise argparse.ArgumentTypeError("'' is empty; accepted: a directory (new or existing)")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; accepted: a directory (new or existing)")
    return path


def _read_tokenizer(directory: Path, config: ModelConfig, accepted: str):
    """The tokenizer training needs from `directory`, refused in one line when missing or unusable."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise TrainingError(f"{path}: no such file; {accepted}")
    try:
        return check_tokenizer(path, config)
    except CheckpointError as error:
        raise TrainingError(str(error)) from None


def main_train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness train", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["tokenizer", "target", "draft"], help="what to train")
    parser.add_argument("--out", type=_directory, required=True, help="the model directory to write")
    parser.add_argument("--teacher", type=Path, help="draft only: the trained target directory (its tokenizer is reused)")
    parser.add_argument("--no-distill", action="store_true", help="draft only: train on hard next-token labels instead")
    parser.add_argument("--steps", type=_positive_int,
                        help="override the schedule's step count (default: the fixed schedule)")
    parser.add_argument("--work-dir", type=_directory,
                        help="where training state is saved (default: .cache/train/<out name>)")
    parser.add_argument("--resume", action="store_true", help=f"continue from <work-dir>/{STATE_FILE}")
    parser.add_argument("--save-every", type=_positive_int, default=100,
                        help="steps between training-state saves (default 100)")
    args = parser.parse_args(argv)
    if args.what != "draft" and (args.teacher or args.no_distill):
        parser.error(f"--teacher and --no-distill are for draft only, not {args.what}")
    if args.what == "draft" and args.teacher is None:
        parser.error("draft needs --teacher (the trained target directory)")
    try:
        return _train_command(args, argv)
    except TrainingError as error:
        print(f"python -m harness train: error: {error}", file=sys.stderr)
        return 2


def _train_command(args: argparse.Namespace, argv: list[str]) -> int:
    """main_train after its arguments are checked: every input is read before anything is written."""
    if args.what == "tokenizer":
        tokenizer = train_tokenizer()
        with replacing_files(args.out) as staging:
            save_tokenizer_files(tokenizer, staging)
        print(f"wrote {args.out / TOKENIZER_FILE}")
        return 0
    config, schedule = (TARGET, TARGET_SCHEDULE) if args.what == "target" else (DRAFT, DRAFT_SCHEDULE)
    if args.steps:
        schedule = Schedule(**{**schedule.__dict__, "steps": args.steps})
    if args.what == "target":
        tokenizer = _read_tokenizer(args.out, config, "the target is trained on the tokenizer in --out: train it "
                                                      f"first (python -m harness train tokenizer --out {args.out})")
    else:
        tokenizer = _read_tokenizer(args.teacher, config, "accepted: a --teacher directory that python -m harness "
                                                          "train target wrote (the draft reuses its tokenizer)")
    teacher = None
    if args.what == "draft" and not args.no_distill:
        try:
            teacher = build_model(load_checkpoint(args.teacher))
        except CheckpointError as error:
            raise TrainingError(f"--teacher: {error}") from None
        if teacher.config.vocab_size != config.vocab_size:
            raise TrainingError(f"--teacher: {args.teacher} has a vocabulary of {teacher.config.vocab_size}; "
                                f"accepted: a target of the draft's {config.vocab_size}")
    name = args.out.resolve().name  # the model's name ("--out ." names it after the current directory)
    work_dir = args.work_dir or Path(".cache/train") / name  # outside the model directory: never committed
    state_path = work_dir / STATE_FILE
    if state_path.exists():
        if not args.resume:
            raise TrainingError(f"{state_path}: a training state exists, which this run would overwrite; accepted: "
                                "--resume to continue it, or delete it (or give another --work-dir) to start over")
        reached = state_step(state_path, Transformer(config))
        if reached > schedule.steps:
            raise TrainingError(f"{state_path}: the state is at step {reached}, past the {schedule.steps} steps "
                                f"asked for; accepted: --steps {reached} or more")
    train_docs, _ = corpus.split(corpus.documents())
    stream = encode(tokenizer, train_docs)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / LOG_FILE).open("a") as log_file:

        def log(line: str) -> None:  # the log is kept beside the model: the evidence of how it was made
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        log(f"python -m harness train {' '.join(argv)}")
        log(f"{args.what}: {sum(p.numel() for p in Transformer(config).parameters()):,} parameters, "
            f"{len(stream):,} training tokens, {schedule}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
        began, cpu_began = time.perf_counter(), time.process_time()
        model = train(config, schedule, stream, work_dir, teacher, args.resume, args.save_every, log)
        save_model(bf16_checkpoint(name, model), tokenizer, args.out)
        log(f"wrote {args.out}: wall {time.perf_counter() - began:.0f}s, cpu {time.process_time() - cpu_began:.0f}s")
    return 0
