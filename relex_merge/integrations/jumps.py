"""Jumps inside a training loop, for any trainer: every ``every`` steps, fit the window of weight
snapshots taken since the last jump and move the live weights ``ahead`` steps along it.

Per tensor (DESIGN.md, "In the training loop"): the anchor is the weights at the last jump (or at
the start), the window's deltas are the snapshots minus the anchor, G = D D^T is their Gram
matrix, and every move is a weight vector W over the window, so the new weights are
``anchor + sum_k W_k delta_k``:

    move: increment   theta_K + (c(s*) - c(s_K)) u      the fitted line's advance (the default)
    move: residual    theta_K + (c(s*) - c_K) u         ... from the observed coefficient
    move: predict     theta_a + c(s*) u                 RELEX's prediction (the off-direction noise dropped)

Guarded twice. The window's own backtest (core.backtest, from the same Gram matrices) sets the
jump's size: the requested horizon if its verdict is SUPPORTED (within the horizon the fit held
and closer than stopping), else the longest of its halvings that is, else no jump. An optional
reward guard compares the mean reward the trainer logged over the ``reward_window`` steps after
a jump with the same number of steps before it, and undoes the jump's displacement (keeping the
training done since) when the reward fell by more than ``reward_margin``.

The optimizer is never touched: its state (Adam's moments) carries on across the jump.

Sharded parameters (FSDP2 / DTensor, FSDP1 with ``use_orig_params=True``): each rank snapshots
and moves only its own slice; the T x T Gram pieces of all tensors are stacked and summed with
one all-reduce, so every rank decides from the full tensors' Gram matrices (rank 0 decides and
broadcasts the weights, so every rank moves by the same W). Replicated placements count once.

Memory: snapshots stay in RAM up to ``memory_budget`` bytes (this rank's slices); beyond it they
are written to ``scratch_dir`` as safetensors files. Either way the Gram pass and the move are the
streaming engine's (relex_merge.engine, the same kernels as a merge), reading the snapshots in
spans within ``engine_memory``.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from relex_merge.common.errors import RelexError
from relex_merge.common.units import parse_size
from relex_merge.core.backtest import DEFAULT_TOLERANCE
from relex_merge.core.relex import FitSpec, RelexSpec, diagnostics, relex_weights
from relex_merge.core.summary import summarize
from relex_merge.core.verdict import assess
from relex_merge.engine import EngineOptions, MergeJob, TensorReport, executor, run_job
from relex_merge.io.base import CheckpointReader, StateDictReader
from relex_merge.io.formats import open_checkpoint

__all__ = ["JumpConfig", "LiveTensor", "live_tensors", "JumpDecision", "decide_jump", "Jumper", "METRIC_PREFIX"]

log = logging.getLogger(__name__)

Move = Literal["increment", "residual", "predict"]
METRIC_PREFIX = "relex/"


@dataclass(frozen=True)
class JumpConfig:
    """What the jumps do. ``every``: real steps between jumps (the window since the last one);
    ``ahead``: steps to jump ahead of the window's last step (or ``to_step``: the step to reach)."""

    every: int = 10
    ahead: int = 10
    to_step: int | None = None  # jump to this (virtual) step instead; no jumps once it is reached
    snapshot_every: int = 1  # steps between snapshots inside the window
    rank: int = 1
    fit: str = "linear"  # a fit family, or "auto" (the backtest picks one per jump)
    shape: float | None = None  # the family's shape parameter (degree, p, tau); None: its default
    move: Move = "increment"
    scale: float = 1.0  # multiplies the move
    guard: bool = True  # the backtest sets the jump's size (no jump where it does not hold)
    tolerance: float = DEFAULT_TOLERANCE  # backtest error under which the fit holds
    min_ahead: int = 1  # the shortest jump the guard may shorten a jump to
    start_step: int = 0  # the first window starts here
    stop_step: int | None = None  # no snapshots or jumps after this step
    reward_guard: bool = False
    reward_window: int = 5  # steps of logged reward compared before and after a jump
    reward_margin: float = 0.05  # undo a jump whose mean reward after fell by more than this
    memory_budget: int | str = "2GB"  # snapshots in RAM (this rank's slices); beyond it: scratch_dir
    scratch_dir: str | Path | None = None  # None: a temporary directory, removed at the end
    engine_memory: int | str = "256MB"  # the engine's span budget for the Gram pass and the move
    threads: int = 1  # engine worker threads (the trainer keeps the rest)

    def __post_init__(self):
        def positive(key: str, value, zero_ok: bool = False):
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
            if not ok:
                raise RelexError(
                    f"RelexCallback: {key} must be a {'non-negative' if zero_ok else 'positive'} integer, got {value!r}"
                )

        for key in ("every", "ahead", "snapshot_every", "rank", "min_ahead", "reward_window", "threads"):
            positive(key, getattr(self, key))
        positive("start_step", self.start_step, zero_ok=True)
        if self.to_step is not None:
            positive("to_step", self.to_step)
        if self.stop_step is not None:
            positive("stop_step", self.stop_step)
        if self.snapshot_every > self.every or self.every % self.snapshot_every:
            raise RelexError(f"RelexCallback: snapshot_every ({self.snapshot_every}) must divide every ({self.every})")
        if self.move not in ("increment", "residual", "predict"):
            raise RelexError(f"RelexCallback: move must be increment, residual or predict, got {self.move!r}")
        for key in ("scale", "tolerance", "reward_margin"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise RelexError(f"RelexCallback: {key} must be a finite number, got {value!r}")
        if self.tolerance <= 0:
            raise RelexError(f"RelexCallback: tolerance must be positive, got {self.tolerance}")
        try:
            FitSpec(self.fit, self.shape)
        except KeyError as exc:
            raise RelexError(f"RelexCallback: fit: {exc.args[0]}") from None
        window = self.every // self.snapshot_every
        needed = FitSpec(self.fit, self.shape).min_points
        if window < max(needed, self.rank):
            raise RelexError(
                f"RelexCallback: the window holds {window} snapshots (every / snapshot_every), fewer than "
                f"fit {self.fit} at rank {self.rank} needs ({max(needed, self.rank)})"
            )
        parse_size(self.memory_budget, "RelexCallback: memory_budget")
        parse_size(self.engine_memory, "RelexCallback: engine_memory")

    def spec(self, anchor_step: int) -> RelexSpec:
        """The fit for a window anchored at ``anchor_step`` (the step the fit's origin is)."""
        return RelexSpec(rank=self.rank, fit=FitSpec(self.fit, self.shape, float(anchor_step)))


# ---- the live weights ---------------------------------------------------------------------------


@dataclass
class LiveTensor:
    """One trainable parameter as this rank sees it."""

    name: str
    param: torch.nn.Parameter
    local: torch.Tensor  # the slice this rank holds and moves (shares the parameter's storage)
    counted: bool  # whether this rank's slice enters the Gram sum (each element counted once)
    numel: int = 0  # elements of the whole tensor (all ranks)
    mirror: torch.Tensor | None = None  # a low-precision copy the trainer computes with (ZeRO-3 bf16)

    def sync(self) -> None:
        """Copy a move of the master slice to the copy the model computes with."""
        if self.mirror is not None:
            self.mirror.copy_(self.local)


def _is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


def _zero3_optimizer(optimizer):
    """DeepSpeed's ZeRO-3 optimizer inside whatever wraps it (accelerate, the engine), or None."""
    opt = optimizer
    for _ in range(4):
        if opt is None:
            return None
        if hasattr(opt, "fp32_partitioned_groups_flat") and hasattr(opt, "fp16_partitioned_groups"):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def _zero3_tensor(name: str, p, index: dict, opt) -> LiveTensor:
    """A ZeRO-3 parameter: this rank's partition of the optimizer's fp32 master weights (what the
    next step starts from), with the model's partition as a mirror when it is another copy."""
    if getattr(p, "ds_secondary_tensor", None) is not None:
        raise RelexError(f"RelexCallback: parameter {name} has a ZeRO++ secondary partition (hpZ; not supported)")
    part = p.ds_tensor
    if id(part) not in index:
        raise RelexError(f"RelexCallback: parameter {name} is not in the ZeRO-3 optimizer's groups (is it trained?)")
    group, offset = index[id(part)]
    flat = opt.fp32_partitioned_groups_flat[group]
    if flat.numel() < offset + part.numel():
        raise RelexError(
            f"RelexCallback: parameter {name}: the ZeRO-3 master weights are swapped out (NVMe offload; not supported)"
        )
    master = flat.narrow(0, offset, part.numel())
    rank = torch.distributed.get_rank(group=p.ds_process_group)
    valid = max(0, min(part.numel(), p.ds_numel - rank * part.numel()))  # the last partitions are padded
    shared = master.data_ptr() == part.data_ptr() and master.dtype == part.dtype
    mirror = None if shared else part.detach().narrow(0, 0, valid)
    return LiveTensor(name, p, master.detach().narrow(0, 0, valid), True, int(p.ds_numel), mirror)


def live_tensors(model: torch.nn.Module, optimizer=None) -> tuple[list[LiveTensor], bool]:
    """Every trainable parameter's local slice, and whether the parameters are sharded (DTensor,
    DeepSpeed ZeRO-3). Refuses layouts where moving the parameters would not move the training."""
    out: list[LiveTensor] = []
    sharded = False
    zero3 = _zero3_optimizer(optimizer)
    wrapped = optimizer
    for _ in range(4):
        if wrapped is not None and hasattr(wrapped, "single_partition_of_fp32_groups"):
            raise RelexError(
                "RelexCallback: DeepSpeed ZeRO-1/2 keeps the weights each step starts from in its optimizer's flat "
                "fp32 partitions: a move of the model's parameters would be undone (not supported; ZeRO-3, FSDP2 "
                "and FSDP1 with use_orig_params=True are)"
            )
        wrapped = getattr(wrapped, "optimizer", None)
    index: dict[int, tuple[int, int]] = {}
    if zero3 is not None:
        for group, parts in enumerate(zero3.fp16_partitioned_groups):
            offset = 0
            for part in parts:
                index[id(part)] = (group, offset)
                offset += part.numel()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False):
            raise RelexError(
                f"RelexCallback: parameter {name} is an FSDP1 flat parameter; wrap the model with "
                "use_orig_params=True (or use FSDP2) so each tensor keeps its own direction"
            )
        if getattr(p, "ds_tensor", None) is not None and zero3 is not None:
            sharded = True
            out.append(_zero3_tensor(name, p, index, zero3))
            continue
        if hasattr(p, "ds_tensor") or hasattr(p, "ds_id"):
            raise RelexError(
                f"RelexCallback: parameter {name} is partitioned by DeepSpeed ZeRO-3, whose optimizer keeps the "
                "weights each step starts from: give the optimizer (begin(model, step, optimizer); the callback "
                "takes the trainer's)"
            )
        if _is_dtensor(p):
            sharded = True
            with torch.no_grad():
                local = p.to_local().detach()  # the engine writes from worker threads, where no_grad is off
            placements = tuple(p.placements)
            if any(pl.is_partial() for pl in placements):
                raise RelexError(f"RelexCallback: parameter {name} has a Partial placement (not a stored slice)")
            coordinate = p.device_mesh.get_coordinate() or [0] * len(placements)
            counted = all(c == 0 for c, pl in zip(coordinate, placements) if pl.is_replicate())
            out.append(LiveTensor(name, p, local, counted, p.numel()))
        else:
            out.append(LiveTensor(name, p, p.data, True, p.numel()))
    if not out:
        raise RelexError("RelexCallback: the model has no trainable parameters")
    if sharded:
        rank = _Comm().rank
        for t in out:
            if not _is_dtensor(t.param) and t.mirror is None and getattr(t.param, "ds_tensor", None) is None:
                t.counted = rank == 0  # a plain tensor beside sharded ones is replicated: count it once
    return out, sharded


class _Comm:
    """The trainer's process group (torch.distributed), or a group of one."""

    def __init__(self):
        dist = torch.distributed
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0

    def _device(self) -> torch.device:
        backend = str(torch.distributed.get_backend()).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (one all-reduce)."""
        if self.world == 1:
            return x
        y = x.to(self._device())
        torch.distributed.all_reduce(y)
        return y.cpu()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device())
        return box[0]


# ---- snapshots: RAM within the budget, then scratch files ---------------------------------------


class _RamReader(StateDictReader):
    """Snapshot tensors in RAM, read without copies (the engine only reads them)."""

    supports_views = True
    thread_safe_reads = True

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._tensors[name]
        return t if rows is None or t.dim() == 0 else t[rows[0] : rows[1]]


class _Snapshots:
    """Copies of this rank's slices, by key ("anchor", "step-12", "delta"): in RAM while they fit
    ``budget`` bytes, else one safetensors file each under ``scratch``."""

    def __init__(self, tensors: list[LiveTensor], budget: int, scratch: Path | None, rank: int):
        self.tensors = tensors
        self.budget = budget
        self.entry_bytes = sum(t.local.numel() * t.local.element_size() for t in tensors)
        self._scratch_root = scratch
        self._own_scratch: Path | None = None
        self.rank = rank
        self.ram: dict[str, dict[str, torch.Tensor]] = {}
        self.disk: dict[str, Path] = {}
        self.spilled = 0  # entries written to disk so far

    @property
    def scratch(self) -> Path:
        if self._scratch_root is None:
            if self._own_scratch is None:
                self._own_scratch = Path(tempfile.mkdtemp(prefix="relex-jumps-"))
            return self._own_scratch
        folder = Path(self._scratch_root) / f"rank{self.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def put(self, key: str, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Store ``tensors`` (default: a copy of the live slices) under ``key``."""
        self.drop(key)
        source = tensors if tensors is not None else {t.name: t.local for t in self.tensors}
        if (len(self.ram) + 1) * self.entry_bytes <= self.budget:
            self.ram[key] = {name: x.detach().to("cpu", copy=True) for name, x in source.items()}
            return
        from safetensors.torch import save_file

        path = self.scratch / f"{key}.safetensors"
        save_file({name: x.detach().to("cpu").contiguous() for name, x in source.items()}, str(path))
        self.disk[key] = path
        self.spilled += 1

    def reader(self, key: str) -> CheckpointReader:
        if key in self.ram:
            return _RamReader(Path(f"<snapshot {key}>"), self.ram[key], [])
        return open_checkpoint(self.disk[key])

    def __contains__(self, key: str) -> bool:
        return key in self.ram or key in self.disk

    def drop(self, key: str) -> None:
        self.ram.pop(key, None)
        path = self.disk.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def clear(self, keep: Sequence[str] = ()) -> None:
        for key in [k for k in [*self.ram, *self.disk] if k not in keep]:
            self.drop(key)

    def close(self) -> None:
        self.clear()
        if self._own_scratch is not None:
            shutil.rmtree(self._own_scratch, ignore_errors=True)
            self._own_scratch = None


class _LiveSink:
    """The engine's output sink for a move: spans go straight into the live slices."""

    def __init__(self, tensors: list[LiveTensor]):
        self._flat: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # non-contiguous slices: (buffer, target)
        for t in tensors:
            if t.local.is_contiguous():
                self._flat[t.name] = t.local.view(-1)
            else:
                buffer = torch.empty(t.local.numel(), dtype=t.local.dtype, device=t.local.device)
                self._flat[t.name] = buffer
                self._pending.append((buffer, t.local))

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        target = self._flat[name]
        target[start : start + chunk.numel()].copy_(chunk.reshape(-1))

    def finish(self) -> None:
        for buffer, target in self._pending:
            target.copy_(buffer.view(target.shape))


# ---- the decision: pure, from the Gram matrices ----------------------------------------------------


@dataclass
class JumpDecision:
    """What the window says: the jump taken (``ahead`` = 0: none), its weights per tensor, and the
    diagnostics the trainer logs."""

    requested: int  # steps ahead asked for
    ahead: int  # steps ahead taken (0: no jump)
    target: int  # the step the jump reaches (in the window's step numbering)
    fit: FitSpec | None  # the fit used (resolved: auto chose it)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (1 x T) W of the move
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # one line: why this jump (or none)


def _move_weights(gram: torch.Tensor, steps: Sequence[int], target: int, spec: RelexSpec, move: Move, scale: float):
    """W (1 x T) with new weights = anchor + W @ deltas, for one tensor."""
    unit = replace(spec, scale=1.0)
    ahead = relex_weights(gram, steps, [target], unit)
    if move == "predict":
        return ahead * scale
    if move == "increment":
        here = relex_weights(gram, steps, [steps[-1]], unit)  # the fitted curve at the last step
    else:
        here = relex_weights(gram, steps, [steps[-1]], replace(unit, mode="reconstruct"))  # the observed coefficient
    w = (ahead - here) * scale
    w[0, -1] += 1.0
    return w


def decide_jump(
    names: Sequence[str],
    numels: Sequence[int],
    grams: Sequence[torch.Tensor],
    steps: Sequence[int],
    anchor_step: int,
    requested: int,
    config: JumpConfig,
) -> JumpDecision:
    """How far to jump from this window (steps ``steps`` since the anchor; full-tensor Gram
    matrices), and each tensor's weights. Pure: the same on every rank for the same input."""
    spec = config.spec(anchor_step)
    last = steps[-1]
    metrics: dict[str, float] = {"jump_requested": float(requested)}
    reports = []
    finite = True
    for name, numel, gram in zip(names, numels, grams):
        ok = bool(torch.isfinite(gram).all())
        finite &= ok
        zero = ok and bool(gram.abs().max() == 0)
        diag = diagnostics(gram, steps, spec) if ok and not zero else None
        reports.append(TensorReport(name, numel, diag, passes=1, zero_delta=zero, nonfinite=not ok))
    summary = summarize(reports)
    if summary.explained_variance_1 is not None:
        metrics["explained_variance_1"] = summary.explained_variance_1.weighted_mean
        metrics["linear_r2"] = summary.linear_r2.weighted_mean
    if not finite:
        bad = next(r.name for r in reports if r.nonfinite)
        return JumpDecision(requested, 0, last, None, {}, {**metrics, "jump_taken": 0.0}, f"no jump: {bad} has NaN/Inf")
    if summary.extrapolated == 0:
        return JumpDecision(requested, 0, last, None, {}, {**metrics, "jump_taken": 0.0}, "no jump: nothing moved")
    # the requested horizon, then its halvings (the guard's fallbacks), each judged by one backtest
    aheads = [requested]
    while config.guard and aheads[-1] // 2 >= config.min_ahead and aheads[-1] // 2 not in aheads:
        aheads.append(aheads[-1] // 2)
    judged_scale = config.scale if config.move == "predict" else 1.0
    specs = [replace(spec, scale=judged_scale)] * len(aheads)
    assessment = assess(grams, list(steps), [last + a for a in aheads], specs, config.tolerance, hints=False)
    first = assessment.verdicts[0]
    metrics.update(
        backtest_error=first.error,
        stop_error=first.stop_error,
        supported=float(first.supported),
        supported_horizon=first.supported_horizon if first.supported_horizon is not None else 0.0,
        horizon=first.horizon,
    )
    chosen = 0 if not config.guard else next((i for i, v in enumerate(assessment.verdicts) if v.supported), None)
    if chosen is None:
        reason = f"no jump (guard): {first.line()}"
        return JumpDecision(requested, 0, last, assessment.fits[0], {}, {**metrics, "jump_taken": 0.0}, reason)
    ahead, fit = aheads[chosen], assessment.fits[chosen]
    target = last + ahead
    fitted = replace(spec, fit=fit)
    weights = {
        name: _move_weights(gram, steps, target, fitted, config.move, config.scale)
        for name, gram, report in zip(names, grams, reports)
        if not report.zero_delta
    }
    verdict = assessment.verdicts[chosen]
    metrics["jump_taken"] = float(ahead)
    reason = f"jump {ahead} of {requested} steps ahead with {fit.describe()}: {verdict.line()}"
    return JumpDecision(requested, ahead, target, fit, weights, metrics, reason)


# ---- the controller --------------------------------------------------------------------------


@dataclass
class _PendingCheck:
    step: int  # the jump's step
    ahead: int


class Jumper:
    """Jumps for any training loop. Call ``begin(model, step)`` before training, ``after_step(step)``
    after every optimizer step (``step`` = optimizer steps done) and, for the reward guard,
    ``record_reward(step, value)`` with each logged mean reward. ``after_step`` returns the
    metrics of what it did (a jump, a reverted one) or None."""

    def __init__(self, config: JumpConfig | None = None, **kwargs):
        self.config = config if config is not None else JumpConfig(**kwargs)
        self.tensors: list[LiveTensor] = []
        self.sharded = False
        self.optimizer = None
        self.comm = _Comm()
        self.store: _Snapshots | None = None
        self.anchor_step: int | None = None
        self.window: list[int] = []  # snapshot steps since the anchor
        self.virtual_offset = 0  # steps jumped so far, less the reverted ones
        self.jumps = 0
        self.reverted = 0
        self.rewards: dict[int, float] = {}
        self.pending: _PendingCheck | None = None
        self.step = 0  # optimizer steps done (the last after_step)
        self.seconds = 0.0  # time spent in snapshots, Gram passes, decisions and moves
        self.history: list[dict] = []  # one record per decision (jump or not) and per reward check
        self._warned: set[str] = set()

    # -- lifecycle

    def begin(self, model: torch.nn.Module, step: int = 0, optimizer=None) -> None:
        """Find the trainable tensors (this rank's slices) and anchor the first window. DeepSpeed
        ZeRO-3 needs the ``optimizer``: its fp32 partitions are the weights that move."""
        c = self.config
        self.tensors, self.sharded = live_tensors(model, optimizer)
        self.optimizer = optimizer
        self.comm = _Comm()
        scratch = Path(c.scratch_dir) if c.scratch_dir is not None else None
        self.store = _Snapshots(self.tensors, parse_size(c.memory_budget, "memory_budget"), scratch, self.comm.rank)
        if step >= c.start_step:
            self._anchor(step)

    def close(self) -> None:
        """Drop every snapshot (and the temporary scratch directory)."""
        if self.store is not None:
            self.store.close()

    @property
    def virtual_step(self) -> int:
        """Steps done plus steps jumped (the step the weights are predicted to be worth)."""
        return self.step + self.virtual_offset

    def _anchor(self, step: int) -> None:
        self.store.clear(keep=["delta"] if self.pending is not None else [])
        self.store.put("anchor")
        self.anchor_step = step
        self.window = []

    # -- per step

    def record_reward(self, step: int, value: float) -> None:
        """A mean reward the trainer logged at ``step`` (the reward guard's input)."""
        if value is not None and math.isfinite(float(value)):
            self.rewards[int(step)] = float(value)
            for old in [s for s in self.rewards if s < step - 4 * (self.config.reward_window + self.config.every)]:
                del self.rewards[old]

    def after_step(self, step: int) -> dict[str, float] | None:
        """After optimizer step ``step``: check a pending reward guard, take a snapshot, jump when
        the window is full. Returns the metrics to log (prefixed ``relex/``) or None."""
        c = self.config
        if self.store is None:
            raise RelexError("RelexCallback: begin() was not called before the first step")
        start = time.perf_counter()
        self.step = step
        metrics: dict[str, float] = {}
        if self.pending is not None and step > self.pending.step + c.reward_window:
            metrics.update(self._check_reward(step))
        if self.anchor_step is None:
            if step >= c.start_step:
                self._anchor(step)
            self.seconds += time.perf_counter() - start
            return self._prefixed(metrics)
        if c.stop_step is not None and step > c.stop_step:
            if self.window or "anchor" in self.store:
                self.store.clear(keep=["delta"] if self.pending is not None else [])
                self.window = []
            self.seconds += time.perf_counter() - start
            return self._prefixed(metrics)
        since = step - self.anchor_step
        if since > 0 and (since % c.snapshot_every == 0 or since >= c.every):
            self.store.put(f"step-{step}")
            self.window.append(step)
        if since >= c.every and self.pending is None and len(self.window) >= 2:
            metrics.update(self._jump(step))
        self.seconds += time.perf_counter() - start
        if metrics:
            metrics["overhead_seconds"] = self.seconds
        return self._prefixed(metrics)

    def _prefixed(self, metrics: dict[str, float]) -> dict[str, float] | None:
        return {METRIC_PREFIX + k: float(v) for k, v in metrics.items()} if metrics else None

    # -- the jump

    def _requested(self, last: int) -> int:
        c = self.config
        if c.to_step is None:
            return c.ahead
        return c.to_step - (last + self.virtual_offset)

    def _jobs(self, steps: Sequence[int]) -> MergeJob:
        spec = self.config.spec(self.anchor_step)
        readers = [self.store.reader(f"step-{s}") for s in steps]
        dtype = torch.float64 if any(t.local.dtype == torch.float64 for t in self.tensors) else torch.float32
        return MergeJob(
            base=self.store.reader("anchor"),
            checkpoints=readers,
            steps=list(steps),
            targets=[],
            spec=spec,
            compute_dtype=dtype,
        )

    def _engine(self) -> EngineOptions:
        c = self.config
        # NaN/Inf in the weights: the Gram matrix says so and decide_jump declines, the run goes on
        return EngineOptions(
            max_memory=parse_size(c.engine_memory, "engine_memory"), allow_nonfinite=True, threads=c.threads
        )

    def _jump(self, step: int) -> dict[str, float]:
        c = self.config
        steps = list(self.window)
        requested = self._requested(steps[-1])
        if requested < c.min_ahead:
            self._anchor(step)  # nothing left to jump to (to_step reached): keep windows short
            return {}
        job = self._jobs(steps)
        stats = run_job(job, [], self._engine(), executor=executor("threads"))
        by_name = {r.name: r.gram for r in stats.tensors}
        names = [t.name for t in self.tensors]
        local = torch.stack(
            [by_name[n] if t.counted else torch.zeros_like(by_name[n]) for n, t in zip(names, self.tensors)]
        )
        grams = self.comm.sum(local) if self.sharded else local
        numels = [t.numel for t in self.tensors]  # full tensors' sizes (all ranks)
        decision = None
        if self.comm.rank == 0:  # every rank has the same Gram matrices; rank 0 decides for all
            decision = decide_jump(names, numels, list(grams), steps, self.anchor_step, requested, c)
        if self.comm.world > 1:
            decision = self.comm.broadcast(decision)
        record = {"step": step, "window": [self.anchor_step, *steps], "requested": requested, "ahead": decision.ahead}
        record.update({k: v for k, v in decision.metrics.items()})
        record["reason"] = decision.reason
        self.history.append(record)
        log.info("step %d: %s", step, decision.reason)
        metrics = dict(decision.metrics)
        if decision.ahead > 0:
            sink = _LiveSink(self.tensors)
            move = replace(job, targets=[decision.target], gram_cache=dict(zip(names, grams)), weights=decision.weights)
            moved = [n for n in names if n in decision.weights]
            with torch.no_grad():
                run_job(move.share(moved), [sink], self._engine(), executor=executor("threads"))
                sink.finish()
                self._moved()
                if c.reward_guard:
                    self._remember_delta(steps[-1])
            self.jumps += 1
            self.virtual_offset += decision.ahead
            if c.reward_guard:
                self._arm_reward_guard(step, decision.ahead)
        for reader in job.readers:
            reader.close()  # spilled snapshots are open files
        metrics.update(jumps=self.jumps, virtual_step=step + self.virtual_offset, snapshots_spilled=self.store.spilled)
        self._anchor(step)
        return metrics

    def _moved(self) -> None:
        """After the master slices moved: the copies the model computes with follow (ZeRO-3 bf16
        partitions; then the parameters ZeRO-3 keeps whole on every rank, gathered again as
        DeepSpeed does after a step). Every rank runs it."""
        for t in self.tensors:
            t.sync()
        zero3 = _zero3_optimizer(self.optimizer)
        persistent = getattr(zero3, "persistent_parameters", None) if zero3 is not None else None
        if persistent:  # release their stale whole copies, then gather the moved partitions
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)

    # -- the reward guard

    def _remember_delta(self, last: int) -> None:
        """The jump's displacement (moved - before), kept until the reward guard decides."""
        before = self.store.reader(f"step-{last}")
        delta = {}
        for t in self.tensors:
            dtype = torch.float64 if t.local.dtype == torch.float64 else torch.float32
            delta[t.name] = t.local.detach().to("cpu", dtype) - before.read(t.name).to(dtype)
        before.close()
        self.store.put("delta", delta)

    def _arm_reward_guard(self, step: int, ahead: int) -> None:
        self.pending = _PendingCheck(step, ahead)

    def _check_reward(self, step: int) -> dict[str, float]:
        c = self.config
        check = self.pending
        self.pending = None
        # the reward logged at the jump's own step is the last one of the weights before it
        before = [v for s, v in self.rewards.items() if check.step - c.reward_window < s <= check.step]
        after = [v for s, v in self.rewards.items() if check.step < s <= check.step + c.reward_window]
        decision = None
        if before and after:
            mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
            decision = (mean_before, mean_after, mean_after < mean_before - c.reward_margin)
        if self.comm.world > 1:
            decision = self.comm.broadcast(decision)
        if decision is None:
            if "no-reward" not in self._warned:
                self._warned.add("no-reward")
                log.warning(
                    "RelexCallback: reward_guard is on but no reward was logged in the %d steps before and after "
                    "the jump at step %d (log it every step: logging_steps=1; reward_key); the guard is skipped",
                    c.reward_window,
                    check.step,
                )
            self.store.drop("delta")
            return {}
        mean_before, mean_after, revert = decision
        metrics = {"reward_before": mean_before, "reward_after": mean_after, "reverted": float(revert)}
        if revert:
            delta = self.store.reader("delta")
            with torch.no_grad():
                for t in self.tensors:
                    t.local.sub_(delta.read(t.name).to(t.local.device, t.local.dtype).view(t.local.shape))
                self._moved()
            delta.close()
            self.reverted += 1
            self.virtual_offset -= check.ahead
            log.info(
                "step %d: reverted the jump of step %d (mean reward %.4f after vs %.4f before)",
                step,
                check.step,
                mean_after,
                mean_before,
            )
            self.store.drop("delta")
            self._anchor(step)  # the window since the jump was taken from the reverted point
        else:
            self.store.drop("delta")
        metrics.update(reverts=self.reverted, virtual_step=step + self.virtual_offset)
        self.history.append({"step": step, "check_of": check.step, **metrics})
        return metrics
