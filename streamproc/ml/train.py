"""Training and evaluation on a dataset directory (``streamproc train`` / ``streamproc eval``).

Windows are preprocessed once per split through :func:`streamproc.models.preprocess.make_batches`
(the same path inference uses) and kept as tensors, so epochs cost only the networks.
Training: AdamW with a one-cycle schedule (warm-up, cosine decay), modality dropout
(each present modality of a window is masked with probability p, never all of them),
early stopping on validation accuracy with the best weights restored. Evaluation: accuracy, macro-F1, accuracy with each
modality removed, and CPU time per window.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from streamproc.config import MODALITIES
from streamproc.errors import UserError
from streamproc.ml.dataset import SPLITS, Dataset, Example
from streamproc.ml.splits import SPLIT_MODES, BlockSplit, block_splits
from streamproc.models import model_device
from streamproc.models.preprocess import Preprocess, WindowBatch, make_batches

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 6  # epochs without a better validation accuracy before stopping
    modality_dropout: float = 0.3
    seed: int = 0
    device: str = "auto"
    progress: bool = True  # tqdm bar per epoch
    # Torch CPU threads while training (0: leave torch's setting). One is the sensible
    # default for these small networks: their ops are too small to split, and on a
    # shared 2-core machine two spinning OpenMP threads ran 3-5x slower than one.
    threads: int = 1


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_acc: float
    val_acc: float | None
    seconds: float


@dataclass
class TrainResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"history": [dataclasses.asdict(h) for h in self.history],
                "best_epoch": self.best_epoch, "best_val_acc": self.best_val_acc,
                "seconds": round(self.seconds, 2)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def preprocess_for(ds: Dataset, **overrides: Any) -> Preprocess:
    """Model preprocessing matching the dataset's window shape."""
    w = ds.window
    if "window_ms" not in w or "sample_rate" not in w:
        raise UserError(f"{ds.path}: the manifest has no window shape (is it empty?)")
    base = {"window_ms": int(w["window_ms"]), "sample_rate": int(w["sample_rate"])}
    if "frames_per_window" in w:
        base["frames_per_window"] = int(w["frames_per_window"])
    return Preprocess(**{**base, **overrides})


@dataclass(frozen=True)
class SplitConfig:
    """How ``train``/``eval`` split a dataset (streamproc.ml.splits)."""

    mode: str = "auto"
    blocks: BlockSplit = field(default_factory=BlockSplit)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, **dataclasses.asdict(self.blocks)}


def dataset_splits(ds: Dataset, how: SplitConfig = SplitConfig(), log: Log = _stderr
                   ) -> dict[str, list[Example]]:
    """The dataset's examples by split: as stored, or by time blocks."""
    if how.mode not in SPLIT_MODES:
        raise UserError(f"split mode must be one of {', '.join(SPLIT_MODES)}, got {how.mode!r}")
    mode = how.mode
    if mode == "auto":
        mode = "stored" if sum(1 for n in ds.splits.values() if n) > 1 else "blocks"
    if mode == "stored":
        return {s: ds.load(s) for s in SPLITS}
    examples = ds.load()
    assigned = block_splits([(e.window.stream_id, e.window.start_ns, e.window.end_ns, e.label)
                             for e in examples], how.blocks)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for e, split in zip(examples, assigned, strict=True):
        if split is not None:
            out[split].append(e._replace(split=split))
    b = how.blocks
    dropped = assigned.count(None)
    log(f"splits by time blocks of {b.block_s:g} s (val {b.val:g}, test {b.test:g}, seed "
        f"{b.seed}): " + ", ".join(f"{s} {len(out[s])}" for s in SPLITS)
        + f" windows; {dropped} dropped at boundaries between splits")
    for s in ("val", "test"):
        if (b.val if s == "val" else b.test) <= 0:
            continue
        missing = sorted({e.label for e in examples} - {e.label for e in out[s]})
        if not out[s]:
            log(f"note: no {s} windows: a class needs 2-3 blocks of {b.block_s:g} s before "
                f"one goes to {s} (record more, or shorten --block-s)")
        elif missing:
            log(f"note: no {s} windows of {missing} (too few blocks of them; record more, "
                "or shorten --block-s)")
    return out


@dataclass
class Split:
    """One split as tensors: the batch, integer targets, and the examples' info."""

    batch: WindowBatch
    y: torch.Tensor
    info: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.y)


def load_split(ds: Dataset, split: str, pre: Preprocess, labels: Sequence[str] | None = None,
               model: Any = None, device: str = "cpu", chunk: int = 256,
               examples: list[Example] | None = None) -> Split | None:
    """Preprocess every window of a split (or of ``examples``, already split); None when
    it is empty.

    With ``model``, the outputs of its frozen pretrained encoders are computed here once
    per window (on ``device``) and the raw frames / waveform they read are dropped, chunk
    by chunk, so a split never holds every window's decoded frames at once.
    """
    from streamproc.models import cache_frozen_features
    from streamproc.models.preprocess import make_batch

    if examples is None:
        examples = ds.load(split)
    if not examples:
        return None
    labels = list(labels or ds.labels)
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise UserError(f"{ds.path}: labels {unknown} are not among the model's {labels}")
    ws = [e.window for e in examples]
    if model is None:
        batch = make_batches(ws, pre, chunk)
    else:
        batch = WindowBatch.cat([
            cache_frozen_features(model, make_batch(ws[i:i + chunk], pre), device)
            for i in range(0, len(ws), chunk)])
    y = torch.tensor([index[e.label] for e in examples], dtype=torch.long)
    return Split(batch, y, [e.info for e in examples])


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------


def modality_keep(present: torch.Tensor, p: float, modalities: Sequence[str],
                  gen: torch.Generator) -> torch.Tensor:
    """bool [B, 3]: which modalities to keep. Each used modality is dropped with
    probability p; a row that would lose all of its present modalities keeps them all."""
    keep = torch.ones_like(present)
    if p <= 0 or len(modalities) < 2:
        return keep
    idx = [MODALITIES.index(m) for m in modalities]
    drop = torch.rand((present.shape[0], len(idx)), generator=gen) < p
    keep[:, idx] = ~drop
    left = (present[:, idx] & keep[:, idx]).any(1)
    keep[~left] = True
    return keep


def _minibatches(n: int, size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(size))


@torch.no_grad()
def predict_logits(model: Any, batch: WindowBatch, batch_size: int = 256) -> torch.Tensor:
    """Logits for a whole (preprocessed) batch, in eval mode."""
    if hasattr(model, "eval"):
        model.eval()
    device = model_device(model)
    outs = [model(batch.select(idx).to(device)).float().cpu()
            for idx in _minibatches(len(batch), batch_size, None)]
    return torch.cat(outs)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch CPU threads set to n (0: unchanged) inside the block, restored after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(model: nn.Module, train: Split, val: Split | None, cfg: TrainConfig,
                log: Log = _stderr) -> TrainResult:
    """Train in place; with ``val``, stop early and restore the best weights."""
    with torch_threads(cfg.threads):
        return _train(model, train, val, cfg, log)


def _train(model: nn.Module, train: Split, val: Split | None, cfg: TrainConfig,
           log: Log) -> TrainResult:
    from tqdm import tqdm

    from streamproc.models import resolve_device

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps),
                                                pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    modalities = getattr(model, "modalities", MODALITIES)
    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    best_acc = -1.0
    stale = 0
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(_minibatches(len(train), cfg.batch_size, gen), leave=False, unit="batch",
                   desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress)
        for idx in bar:
            b = train.batch.select(idx)
            b = b.mask_modalities(modality_keep(b.present, cfg.modality_dropout, modalities, gen))
            b, y = b.to(device), train.y[idx].to(device)
            logits = model(b)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        val_acc = None
        if val is not None:
            val_acc = accuracy(val.y, predict_logits(model, val.batch))
        stats = EpochStats(epoch, total_loss / seen, correct / seen, val_acc,
                           time.perf_counter() - t0)
        result.history.append(stats)
        better = val_acc is not None and val_acc > best_acc
        log(f"epoch {epoch:>3}/{cfg.epochs}  loss {stats.loss:.4f}  train acc "
            f"{stats.train_acc:.3f}" + (f"  val acc {val_acc:.3f}" if val_acc is not None
                                        else "") + ("  *" if better else "")
            + f"  ({stats.seconds:.1f}s)")
        if val is None:
            continue
        if better and val_acc is not None:
            best_acc, stale, result.best_epoch = val_acc, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                log(f"early stop: no better validation accuracy for {cfg.patience} epochs; "
                    f"keeping epoch {result.best_epoch}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        result.best_val_acc = best_acc
    else:
        result.best_epoch = len(result.history)
    result.seconds = time.perf_counter() - t_start
    model.eval()
    return result


# ---------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------


def accuracy(y: torch.Tensor, logits: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")


def macro_f1(y: torch.Tensor, logits: torch.Tensor, n_classes: int) -> float:
    """Mean of per-class F1 over the classes that occur in y or in the predictions."""
    pred = logits.argmax(1)
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def evaluate(model: nn.Module, split: Split, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1, plus accuracy with each used modality removed."""
    logits = predict_logits(model, split.batch)
    out = {"accuracy": accuracy(split.y, logits),
           "macro_f1": macro_f1(split.y, logits, n_classes)}
    for m in getattr(model, "modalities", MODALITIES):
        if len(getattr(model, "modalities", MODALITIES)) > 1:
            out[f"without_{m}"] = accuracy(split.y, predict_logits(model, split.batch.without(m)))
    return out


@torch.no_grad()
def time_per_window(model: nn.Module, batch: WindowBatch, batch_size: int,
                    repeats: int = 20) -> float:
    """Median CPU milliseconds per window of the model's forward pass at ``batch_size``."""
    if hasattr(model, "eval"):
        model.eval()
    device = model_device(model)
    rows = torch.arange(batch_size) % len(batch)
    b = batch.select(rows).to(device)
    for _ in range(min(3, repeats)):
        model(b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(b)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000 / batch_size


def time_preprocess(windows: Sequence[Any], pre: Preprocess, batch_size: int,
                    repeats: int = 5) -> float:
    """Median milliseconds per window of make_batch (decode, log-mel, hashing)."""
    from streamproc.models.preprocess import make_batch

    ws = [windows[i % len(windows)] for i in range(batch_size)]
    make_batch(ws, pre)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        make_batch(ws, pre)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000 / batch_size


# ---------------------------------------------------------------------------------------
# `streamproc train`
# ---------------------------------------------------------------------------------------


def train_command(dataset: str | Path, model_name: str, out: str | Path, cfg: TrainConfig,
                  model_options: dict[str, Any] | None = None, log: Log = _stderr,
                  splits: SplitConfig = SplitConfig()) -> dict[str, Any]:
    """Train one registered architecture on a dataset, save a checkpoint, report test."""
    from streamproc.models import count_parameters, create_model, resolve_device
    from streamproc.models.checkpoint import save_checkpoint
    from streamproc.models.encoders import FrozenEncoder

    t_all = time.perf_counter()
    ds = Dataset(dataset)
    log(f"dataset {ds.path}: {len(ds)} windows {ds.splits}, labels {ds.labels}")
    parts = dataset_splits(ds, splits, log)
    seed_everything(cfg.seed)
    # the model first: pretrained encoders decide part of the preprocessing (input size,
    # colour, waveform), and their frozen features are computed once while loading
    model = create_model(model_name, ds.labels, preprocess_for(ds), **(model_options or {}))
    pre = model.preprocess
    dev = str(resolve_device(cfg.device))
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        train, val, test = (load_split(ds, s, pre, model=model, device=dev,
                                       examples=parts[s]) for s in SPLITS)
    if train is None:
        raise UserError(f"{ds.path} has no 'train' windows")
    frozen = [f"{m} {e.config.kind}" for m, e in model.encoders.items()
              if isinstance(e, FrozenEncoder)]
    log(f"model {model_name}: {count_parameters(model):,} trained parameters"
        + (f" (frozen pretrained: {', '.join(frozen)})" if frozen else "")
        + f"; device {cfg.device}; modality dropout {cfg.modality_dropout}; windows "
        f"preprocessed in {time.perf_counter() - t0:.1f}s")
    result = train_model(model, train, val, cfg, log)
    report: dict[str, Any] = {"model": model_name, "parameters": count_parameters(model),
                              "train": result.to_json()}
    if test is not None:
        report["test"] = evaluate(model, test, len(ds.labels))
        log("test: " + ", ".join(f"{k} {v:.3f}" for k, v in report["test"].items()))
    extra = {"dataset": str(ds.path), "dataset_source": ds.manifest.get("source", {}),
             "dataset_windows": len(ds), "splits": {**splits.to_json(),
                                                    **{s: len(parts[s]) for s in SPLITS}},
             "train_config": dataclasses.asdict(cfg), **report}
    path = save_checkpoint(model.cpu(), out, extra)
    log(f"checkpoint written to {path} ({time.perf_counter() - t_all:.1f} s in all)")
    report["checkpoint"] = str(path)
    return report


def eval_checkpoints(dataset: str | Path, specs: Sequence[str], device: str = "cpu",
                     log: Log = _stderr, splits: SplitConfig = SplitConfig()
                     ) -> list[dict[str, Any]]:
    """Evaluate given models (checkpoints or import paths) on a dataset's test split."""
    from streamproc.models import load_model

    ds = Dataset(dataset)
    parts = dataset_splits(ds, splits, log)
    rows = []
    for spec in specs:
        model = load_model(spec, device)
        split_name = "test" if parts["test"] else next((s for s in SPLITS if parts[s]), "test")
        split = load_split(ds, split_name, model.preprocess, model.labels,
                           examples=parts[split_name])
        if split is None:
            raise UserError(f"{ds.path} has no windows to evaluate on")
        row = {"model": spec, "name": model.name, "split": split_name, "windows": len(split),
               **evaluate(model, split, len(model.labels))}
        log(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()))
        rows.append(row)
    return rows


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


# ---------------------------------------------------------------------------------------
# `streamproc eval`: every fusion method and every single modality, over seeds
# ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    method: str
    seed: int
    params: int
    metrics: dict[str, float]
    val_acc: float | None
    best_epoch: int
    seconds: float


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]  # drop NaN
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def _pct(mean: float, std: float | None = None) -> str:
    if mean != mean:
        return "—"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def benchmark(dataset: str | Path, out_dir: str | Path, *,
              methods: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2),
              cfg: TrainConfig = TrainConfig(), ensemble_size: int = 3,
              text_encoder: str = "gru", video_encoder: str = "cnn",
              audio_encoder: str = "cnn", log: Log = _stderr,
              splits: SplitConfig = SplitConfig()) -> dict[str, Any]:
    """Train and test every method on every seed; write results.{json,md,png}.

    The best single modality (by mean test accuracy, as in the fusion-gain goal it
    controls) is also trained ``ensemble_size - 1`` more times per seed and averaged
    (probabilities): the same-modality ensemble control, which shows whether fusion gains
    are more than the gains of averaging several models of one modality.
    """
    with torch_threads(cfg.threads):
        return _benchmark(dataset, out_dir, methods=methods, seeds=seeds, cfg=cfg,
                          ensemble_size=ensemble_size,
                          encoders={"text_encoder": text_encoder,
                                    "video_encoder": video_encoder,
                                    "audio_encoder": audio_encoder}, log=log,
                          splits=splits)


def _benchmark(dataset: str | Path, out_dir: str | Path, *, methods: Sequence[str] | None,
               seeds: Sequence[int], cfg: TrainConfig, ensemble_size: int,
               encoders: dict[str, str], log: Log, splits: SplitConfig) -> dict[str, Any]:
    from streamproc.models import (
        FUSION_MODELS,
        SINGLE_MODELS,
        count_parameters,
        create_model,
        resolve_device,
    )
    from streamproc.models.checkpoint import save_checkpoint

    methods = list(methods or (*FUSION_MODELS, *SINGLE_MODELS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = Dataset(dataset)
    # one model with every modality's encoder: its preprocessing and frozen features serve
    # every method (they share the encoders)
    probe = create_model("early", ds.labels, preprocess_for(ds), **encoders)
    pre = probe.preprocess
    t0 = time.perf_counter()
    dev = str(resolve_device(cfg.device))
    parts = dataset_splits(ds, splits, log)
    train, val, test = (load_split(ds, s, pre, model=probe, device=dev, examples=parts[s])
                        for s in SPLITS)
    if train is None or test is None:
        raise UserError(f"{ds.path}: eval needs 'train' and 'test' splits, has {ds.splits}")
    n_classes = len(ds.labels)
    log(f"dataset {ds.path}: train {len(train)}, val {len(val) if val else 0}, test "
        f"{len(test)} windows; preprocessed in {time.perf_counter() - t0:.1f}s; torch threads "
        f"{torch.get_num_threads()}")

    def fit(method: str, seed: int) -> tuple[nn.Module, RunResult, torch.Tensor]:
        seed_everything(seed)
        model = create_model(method, ds.labels, pre, **encoders)
        res = train_model(model, train, val, dataclasses.replace(cfg, seed=seed),
                          log=lambda _msg: None)
        model.cpu()
        probs = torch.softmax(predict_logits(model, test.batch), 1)
        run = RunResult(method, seed, count_parameters(model), evaluate(model, test, n_classes),
                        res.best_val_acc, res.best_epoch, res.seconds)
        log(f"{method:<10} seed {seed}: test acc {run.metrics['accuracy']:.3f}  macro-F1 "
            f"{run.metrics['macro_f1']:.3f}  val acc {run.val_acc or float('nan'):.3f}  "
            f"epoch {run.best_epoch}  {run.seconds:.0f}s")
        return model, run, probs

    runs: list[RunResult] = []
    probs: dict[tuple[str, int], torch.Tensor] = {}
    timing: dict[str, dict[str, float]] = {}
    sample = [e.window for e in parts["test"][:64]]
    # timed on raw windows: cached frozen features would leave the backbones out (and
    # a pretrained backbone's forward is long enough to need few repeats)
    timed = make_batches(sample, pre) if test.batch.features else test.batch
    reps = 3 if test.batch.features else 20
    for method in methods:
        for seed in seeds:
            model, run, p = fit(method, seed)
            runs.append(run)
            probs[(method, seed)] = p
            if seed == seeds[0]:
                save_checkpoint(model, out / "checkpoints" / method,
                                {"benchmark_run": dataclasses.asdict(run)})
                timing[method] = {"b1": time_per_window(model, timed, 1, reps),
                                  "b32": time_per_window(model, timed, 32, reps)}
    timing["preprocess"] = {"b1": time_preprocess(sample, pre, 1),
                            "b32": time_preprocess(sample, pre, 32)}

    singles = [m for m in methods if m in SINGLE_MODELS]
    ensemble: dict[str, Any] | None = None
    if singles and ensemble_size > 1:
        best_single = max(singles, key=lambda m: _mean_std(
            [r.metrics["accuracy"] for r in runs if r.method == m])[0])
        log(f"ensemble control: {ensemble_size} x {best_single} (the best single modality)")
        accs, f1s, b1, b32 = [], [], [], []
        params = 0
        for seed in seeds:
            members_p = [probs[(best_single, seed)]]
            members = []
            for j in range(1, ensemble_size):
                model, run, p = fit(best_single, seed + 1000 * j)
                members_p.append(p)
                members.append(model)
            avg = torch.stack(members_p).mean(0)
            accs.append(accuracy(test.y, avg))
            f1s.append(macro_f1(test.y, avg, n_classes))
            params = ensemble_size * next(r.params for r in runs if r.method == best_single)
            if seed == seeds[0]:
                b1.append(sum(time_per_window(m, timed, 1, reps) for m in members)
                          + timing[best_single]["b1"])
                b32.append(sum(time_per_window(m, timed, 32, reps) for m in members)
                           + timing[best_single]["b32"])
        ensemble = {"modality": best_single, "size": ensemble_size, "accuracy": accs,
                    "macro_f1": f1s, "params": params, "b1": b1[0], "b32": b32[0]}

    results = {"dataset": str(ds.path), "windows": {"train": len(train),
               "val": len(val) if val else 0, "test": len(test)},
               "labels": ds.labels, "seeds": list(seeds),
               "train_config": dataclasses.asdict(cfg),
               **encoders, "threads": torch.get_num_threads(),
               "runs": [dataclasses.asdict(r) for r in runs], "timing_ms": timing,
               "ensemble": ensemble, "seconds": round(time.perf_counter() - t0, 1)}
    results["summary"] = summarize(results)
    write_json(out / "results.json", results)
    md = results_markdown(results)
    (out / "results.md").write_text(md)
    results["markdown"] = md
    plot_results(results, out / "results.png")
    log(f"wrote {out / 'results.md'}, results.json, results.png; {results['seconds']:.0f}s")
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per-method mean ± std and the issue's three goals, computed from the runs."""
    from streamproc.models import FUSION_MODELS, SINGLE_MODELS

    runs = results["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    rows: dict[str, dict[str, Any]] = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        keys = [k for k in rs[0]["metrics"]]
        rows[m] = {k: _mean_std([r["metrics"][k] for r in rs]) for k in keys}
        rows[m]["params"] = rs[0]["params"]
    fusions = [m for m in methods if m in FUSION_MODELS]
    singles = [m for m in methods if m in SINGLE_MODELS]
    goals: dict[str, Any] = {}
    if fusions and singles:
        bf = max(fusions, key=lambda m: rows[m]["accuracy"][0])
        bs = max(singles, key=lambda m: rows[m]["accuracy"][0])
        gap = rows[bf]["accuracy"][0] - rows[bs]["accuracy"][0]
        spread = rows[bf]["accuracy"][1] + rows[bs]["accuracy"][1]
        goals["fusion_gain"] = {"best_fusion": bf, "best_single": bs, "gap": gap,
                                "spread": spread, "met": gap >= 0.05 and gap > spread}
        removal = {}
        for f in fusions:
            checks = {}
            for m in singles:
                key = f"without_{m}"
                if key not in rows[f]:
                    continue
                rest = [s for s in singles if s != m]
                if not rest:
                    continue
                ref = max(rest, key=lambda s: rows[s]["accuracy"][0])
                checks[m] = {"accuracy": rows[f][key][0], "best_remaining": ref,
                             "reference": rows[ref]["accuracy"][0],
                             "met": rows[f][key][0] >= rows[ref]["accuracy"][0]}
            removal[f] = {"checks": checks, "met": all(c["met"] for c in checks.values())}
        goals["modality_removal"] = removal
    if "lmf" in rows and "tfn" in rows:
        diff = rows["lmf"]["accuracy"][0] - rows["tfn"]["accuracy"][0]
        goals["lmf_vs_tfn"] = {"difference": diff, "lmf_params": rows["lmf"]["params"],
                               "tfn_params": rows["tfn"]["params"],
                               "met": abs(diff) <= 0.01 + 1e-9
                               and rows["lmf"]["params"] < rows["tfn"]["params"]}
    return {"rows": rows, "goals": goals}


def results_markdown(results: dict[str, Any]) -> str:
    """The eval table, the ensemble control and the goal checks, as Markdown."""
    from streamproc.models import SINGLE_MODELS

    s = results["summary"]
    rows, goals, timing = s["rows"], s["goals"], results["timing_ms"]
    n = len(results["seeds"])
    w = results["windows"]
    lines = [
        f"Test split: {w['test']} windows (held-out voices, noise seeds, digit images); "
        f"train {w['train']}, val {w['val']}. Mean ± std over {n} seeds "
        f"({', '.join(map(str, results['seeds']))}); CPU ms per window = model forward on "
        f"preprocessed tensors, torch threads: {results['threads']}.",
        "",
        "| model | params | accuracy % | macro-F1 % | −video % | −audio % | −text % "
        "| ms/window b=1 | ms/window b=32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in rows.items():
        kind = "single" if m in SINGLE_MODELS else "fusion"
        cells = [f"{m} ({kind})", f"{r['params']:,}", _pct(*r["accuracy"]),
                 _pct(*r["macro_f1"])]
        for mod in ("video", "audio", "text"):
            key = f"without_{mod}"
            cells.append(_pct(*r[key]) if key in r else "—")
        t = timing.get(m, {})
        cells += [f"{t.get('b1', float('nan')):.2f}", f"{t.get('b32', float('nan')):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ens = results.get("ensemble")
    if ens:
        a, f = _mean_std(ens["accuracy"]), _mean_std(ens["macro_f1"])
        lines.append(f"| ensemble {ens['size']}× {ens['modality']} (control) | "
                     f"{ens['params']:,} | {_pct(*a)} | {_pct(*f)} | — | — | — | "
                     f"{ens['b1']:.2f} | {ens['b32']:.3f} |")
    p = timing.get("preprocess")
    if p:
        lines.append(f"| preprocessing (shared: JPEG decode, log-mel, hashing) | — | — | — | — "
                     f"| — | — | {p['b1']:.2f} | {p['b32']:.3f} |")
    lines += ["", "Goals (computed from the table above):", ""]
    g = goals.get("fusion_gain")
    if g:
        lines.append(f"- {'MET' if g['met'] else 'NOT MET'}: best fusion ({g['best_fusion']}) "
                     f"beats the best single modality ({g['best_single']}) by "
                     f"{100 * g['gap']:.1f} points (goal ≥ 5) with a seed spread (sum of the "
                     f"two stds) of {100 * g['spread']:.1f}.")
    for f, rem in goals.get("modality_removal", {}).items():
        parts = [f"−{m} {_pct(c['accuracy'])} vs {c['best_remaining']} "
                 f"{_pct(c['reference'])}" for m, c in rem["checks"].items()]
        lines.append(f"- {'MET' if rem['met'] else 'NOT MET'}: {f} with one modality removed "
                     f"≥ the best remaining single modality: {'; '.join(parts)}.")
    g = goals.get("lmf_vs_tfn")
    if g:
        spread = rows["lmf"]["accuracy"][1] + rows["tfn"]["accuracy"][1]
        lines.append(f"- {'MET' if g['met'] else 'NOT MET'}: LMF − TFN accuracy = "
                     f"{100 * g['difference']:+.1f} points (goal within ±1; seed spread, sum "
                     f"of the two stds, {100 * spread:.1f}) with {g['lmf_params']:,} vs "
                     f"{g['tfn_params']:,} parameters.")
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Accuracy per method (mean ± std) and accuracy with each modality removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from streamproc.models import SINGLE_MODELS

    rows = results["summary"]["rows"]
    names = list(rows)
    ens = results.get("ensemble")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    means = [100 * rows[m]["accuracy"][0] for m in names]
    stds = [100 * rows[m]["accuracy"][1] for m in names]
    colors = ["#999999" if m in SINGLE_MODELS else "#2b6cb0" for m in names]
    if ens:
        a = _mean_std(ens["accuracy"])
        names = [*names, f"ens {ens['size']}×{ens['modality']}"]
        means.append(100 * a[0])
        stds.append(100 * a[1])
        colors.append("#dd8452")
    ax1.bar(names, means, yerr=stds, color=colors, capsize=3)
    ax1.axhline(100 / max(2, len(results.get("labels", [])) or 10), color="k", lw=0.8,
                ls=":", label="chance")
    ax1.set_ylabel("test accuracy %")
    ax1.set_title("fusion (blue) vs single modality (grey) vs ensemble control")
    ax1.tick_params(axis="x", rotation=30)
    ax1.legend(loc="upper right")
    fusions = [m for m in rows if m not in SINGLE_MODELS]
    conds = [("accuracy", "all"), ("without_video", "−video"), ("without_audio", "−audio"),
             ("without_text", "−text")]
    width = 0.8 / len(conds)
    for i, (key, label) in enumerate(conds):
        xs = [j + (i - 1.5) * width for j in range(len(fusions))]
        ys = [100 * rows[f][key][0] if key in rows[f] else 0 for f in fusions]
        ax2.bar(xs, ys, width, label=label)
    styles = {"video": ("#1f77b4", "--"), "audio": ("#ff7f0e", "-."), "text": ("#d62728", ":")}
    for m in rows:
        if m in SINGLE_MODELS:
            color, ls = styles.get(m, ("#555555", "--"))
            ax2.axhline(100 * rows[m]["accuracy"][0], ls=ls, lw=1.2, color=color,
                        label=f"{m} only (single model)")
    ax2.set_xticks(range(len(fusions)), fusions)
    ax2.set_ylabel("test accuracy %")
    ax2.set_title("fusion with one modality removed at test time")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
