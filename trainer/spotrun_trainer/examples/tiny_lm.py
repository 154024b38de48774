"""A small character-level transformer language model: spotrun's default job.

``python -m spotrun_trainer.examples.tiny_lm`` trains it on the corpus shipped
with the package (or ``corpus.txt`` on the dataset volume), checkpoints through
the session, resumes exactly after an interruption, stops early when the
validation loss stops improving, and writes the final model to the ticket's
``output.model_uri``. Deterministic on CPU: fixed seeds, deterministic algorithms,
a fixed number of threads. On a GPU it trains with mixed precision and gradient
accumulation.

Settings (environment, all optional): ``SPOTRUN_EXAMPLE_STEPS`` (200),
``_D_MODEL`` (64), ``_LAYERS`` (2), ``_HEADS`` (4), ``_CONTEXT`` (64), ``_BATCH``
(16), ``_ACCUM`` (1 on CPU, 2 on GPU), ``_LR`` (0.003), ``_DROPOUT`` (0.1),
``_SEED`` (1234), ``_EVAL_EVERY`` (25), ``_PATIENCE`` (4 evaluations),
``_STEP_SLEEP`` (0 s; slows steps down for demos), ``_THREADS`` (1),
``_CORPUS`` (a text file), each prefixed ``SPOTRUN_EXAMPLE``.

Without a ticket (``SPOTRUN_TICKET`` unset) it runs standalone: checkpoints and the
final model go to ``$SPOTRUN_CHECKPOINT_DIR`` (``./spotrun-checkpoints``), and a
second run resumes from there; delete the folder to start over.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from spotrun_trainer.data import ResumableSampler
from spotrun_trainer.session import Session

log = logging.getLogger("spotrun_trainer.examples.tiny_lm")

CORPUS = Path(__file__).with_name("corpus.txt")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SPOTRUN_EXAMPLE_{name}", default)


@dataclass(frozen=True)
class Config:
    steps: int
    d_model: int
    layers: int
    heads: int
    context: int
    batch: int
    accum: int
    lr: float
    dropout: float
    seed: int
    eval_every: int
    patience: int
    step_sleep: float
    threads: int
    corpus: str | None

    @classmethod
    def from_env(cls, on_gpu: bool) -> Config:
        return cls(
            steps=int(_env("STEPS", "200")),
            d_model=int(_env("D_MODEL", "64")),
            layers=int(_env("LAYERS", "2")),
            heads=int(_env("HEADS", "4")),
            context=int(_env("CONTEXT", "64")),
            batch=int(_env("BATCH", "16")),
            accum=int(_env("ACCUM", "2" if on_gpu else "1")),
            lr=float(_env("LR", "0.003")),
            dropout=float(_env("DROPOUT", "0.1")),
            seed=int(_env("SEED", "1234")),
            eval_every=int(_env("EVAL_EVERY", "25")),
            patience=int(_env("PATIENCE", "4")),
            step_sleep=float(_env("STEP_SLEEP", "0")),
            threads=int(_env("THREADS", "1")),
            corpus=os.environ.get("SPOTRUN_EXAMPLE_CORPUS"),
        )


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, d_model: int, heads: int, context: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.dropout = nn.Dropout(dropout)
        mask = torch.tril(torch.ones(context, context, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        scores = scores.masked_fill(~self.mask[:length, :length], float("-inf"))
        attention = self.dropout(scores.softmax(dim=-1))
        y = (attention @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.dropout(self.proj(y))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, config: Config) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, config.d_model)
        self.position = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.heads, config.context, config.dropout)
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class PortableScaler:
    """The grad scaler's state, portable across instance types.

    A checkpoint from a run without loss scaling (CPU, or a GPU with bf16) holds an
    empty scaler state; resumed on an fp16-only GPU (a T4, say), torch refuses to
    load it into an enabled scaler. Such a resume starts from the default scale, as
    a new run would; the other way round, a disabled scaler ignores the state.
    """

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


class EarlyStopping:
    """Stops after ``patience`` evaluations without a better validation loss."""

    def __init__(self, patience: int, min_delta: float = 1e-3) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.best_step = 0
        self.bad_evaluations = 0
        self.stopped = False

    def update(self, step: int, loss: float) -> None:
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evaluations = loss, step, 0
        else:
            self.bad_evaluations += 1
            self.stopped = self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_step = int(state["best_step"])
        self.bad_evaluations = int(state["bad_evaluations"])
        self.stopped = bool(state["stopped"])


def load_text(config: Config, dataset_dir: str | None) -> str:
    """The corpus: an explicit file, the dataset volume's corpus.txt, or the shipped one."""
    candidates = [config.corpus] if config.corpus else []
    if dataset_dir:
        candidates.append(str(Path(dataset_dir) / "corpus.txt"))
    candidates.append(str(CORPUS))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text(encoding="utf-8")
    raise FileNotFoundError(f"no corpus in {candidates}")


def lr_lambda_for(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    # cuBLAS is deterministic only with a fixed workspace; set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    config = Config.from_env(on_gpu)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=on_gpu)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    try:
        import numpy as np

        np.random.seed(config.seed)
    except ImportError:
        pass

    with Session.from_env() as session:
        text = load_text(config, session.ticket.dataset_dir)
        vocab = sorted(set(text))
        encoded = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
        split = int(len(encoded) * 0.9)
        train, valid = encoded[:split], encoded[split:]
        windows = len(train) - config.context - 1
        sampler = ResumableSampler(windows, config.batch, seed=config.seed)

        model = TinyLM(len(vocab), config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda_for(config.steps, warmup=max(1, config.steps // 20))
        )
        amp_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
        # bf16 has fp32's range: loss scaling is only needed for fp16.
        scaler = torch.amp.GradScaler("cuda", enabled=on_gpu and amp_dtype == torch.float16)
        early = EarlyStopping(config.patience)

        step = session.restore(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=PortableScaler(scaler),
            data=sampler,
            early_stopping=early,
        )
        offsets = torch.arange(config.context + 1)

        def batch_at(indices: list[int], source: torch.Tensor) -> tuple[torch.Tensor, ...]:
            rows = source[torch.tensor(indices)[:, None] + offsets]
            return rows[:, :-1].to(device), rows[:, 1:].to(device)

        valid_starts = list(range(0, len(valid) - config.context - 1, config.context))
        valid_x, valid_y = batch_at(valid_starts, valid)

        def evaluate() -> float:
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=on_gpu):
                loss = model(valid_x, valid_y).item()
            model.train()
            return loss

        loss_value = math.nan
        model.train()
        while step < config.steps and not early.stopped:
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for _ in range(config.accum):
                x, y = batch_at(sampler.next_batch(), train)
                with torch.autocast(device.type, amp_dtype, enabled=on_gpu):
                    loss = model(x, y) / config.accum
                scaler.scale(loss).backward()
                loss_value += loss.item()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            session.log_step(step, loss=round(loss_value, 5), lr=scheduler.get_last_lr()[0])
            if step % config.eval_every == 0:
                val_loss = evaluate()
                early.update(step, val_loss)
                log.info("step %d: validation loss %.4f (best %.4f)", step, val_loss, early.best)
            if config.step_sleep:
                time.sleep(config.step_sleep)
            if session.should_checkpoint(step):
                session.save(step)

        metrics = {
            "train_loss": loss_value,
            "best_val_loss": early.best if math.isfinite(early.best) else None,
            "best_step": early.best_step,
            "early_stopped": early.stopped,
            "steps": step,
        }
        session.complete(step, model, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
