"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3, and the BF16 optimizer), read span by span
from DeepSpeed's own files, without DeepSpeed.

A tag folder (``global_stepN/``, what ``engine.save_checkpoint`` writes; OpenRLHF puts it in
``ckpt/_actor/``, HF Trainer in ``checkpoint-N/``) holds, per data-parallel rank R:

``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``
    ``optimizer_state_dict``: ``partition_count`` (the data-parallel world size), ``zero_stage``
    (absent from the BF16 optimizer's ``bf16_`` files), and rank R's share of the optimizer's
    fp32 master weights: ZeRO-1/2 ``single_partition_of_fp32_groups`` (one flat slice of each
    parameter group; every rank holds as many elements, the last without the group's
    alignment padding; ``param_alignment_paddings`` lists the padding after each parameter),
    ZeRO-3 ``fp32_flat_groups`` (rank R's partition of every parameter in turn: each takes
    ceil(numel / W) elements on every rank, zero-padded on the last).
``mp_rank_00_model_states.pt`` (ZeRO-1/2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt`` (ZeRO-3)
    ``param_shapes`` (name -> shape, per group, in flat order), ``buffer_names``, the frozen
    parameters (``frozen_param_shapes``/``frozen_param_fragments``), ``shared_params`` (alias ->
    the name it shares storage with) and ``module``: the state dict in the trainer's dtype
    (ZeRO-1/2: whole tensors; ZeRO-3: empty placeholders).

The reader exposes what DeepSpeed's ``zero_to_fp32`` consolidates (the fp32 master weights, the
buffers in fp32, frozen parameters, shared aliases; same names, same order, same bits) without
consolidating anything: every file is memory-mapped when opened, a read copies one span of rows
out of the ranks' flat partitions, and the span's pages are then given back
(``relex_merge.io.pages``), so resident memory stays near one span whatever the model's size.
ZeRO-1 does not record frozen parameters, and ``zero_to_fp32`` drops them; here they come from
the module copy, in the trainer's dtype. The trainer's own weights in a bf16/fp16 run are the
fp32 master cast to that dtype (DeepSpeed copies them so): ``--dtype bfloat16`` gives them.

DeepSpeed's files are pickles. They are loaded weights-only, with the four non-tensor classes
DeepSpeed puts in them allow-listed as inert stand-ins of ours under DeepSpeed's names
(``DEEPSPEED_TYPES``): DeepSpeed is never imported and nothing in the files runs. A file that
holds anything else is refused in one line unless the user passes ``--allow-unsafe-pickle``.
Tensor- and pipeline-parallel saves (``mp_rank_01``, ``layer_*``) are refused.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import logging
import math
import re
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.base import CheckpointFormat, CheckpointReader, KnownType, TensorMeta, glob_any, load_torch_file
from relex_merge.io.pages import FileMappings

__all__ = ["FORMAT", "ZeroReader", "DEEPSPEED_TYPES"]

log = logging.getLogger(__name__)

_PATTERNS = ("*zero_pp_rank_*_optim_states.pt", "*/*zero_pp_rank_*_optim_states.pt")
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


# --- the non-tensor classes in DeepSpeed's pickles, as inert stand-ins ------------------------


class LossScaler:
    """deepspeed.runtime.fp16.loss_scaler.LossScaler (plain attributes: cur_scale, dynamic)."""


class DynamicLossScaler:
    """deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler (fp16 runs; plain attributes)."""


class ZeroStageEnum(int, enum.Enum):
    """deepspeed.runtime.zero.config.ZeroStageEnum, pickled as ZeroStageEnum(value)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class fragment_address:  # noqa: N801  (DeepSpeed's name, as pickled)
    """deepspeed.utils.tensor_fragment.fragment_address: where a parameter's piece sits in a
    rank's ZeRO-1/2 partition (``param_slice_mappings``; not needed to read the weights)."""

    numel: int = 0
    start: int = 0


DEEPSPEED_TYPES: tuple[KnownType, ...] = (
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (fragment_address, "deepspeed.utils.tensor_fragment.fragment_address"),
)
"""Everything DeepSpeed's ZeRO files hold beyond tensors, containers, torch.Size and
OrderedDict (DeepSpeed 0.19; the classes' names have not moved since ZeRO-3 came)."""


# --- where a tensor's elements are ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Flat:
    """A trainable parameter in ZeRO-1/2 group ``group``, from element ``offset`` of the
    group's flat vector, which the ranks hold in slices of ``per_rank`` elements."""

    group: int
    offset: int
    per_rank: int


@dataclasses.dataclass(frozen=True)
class _Partitioned:
    """A trainable ZeRO-3 parameter: rank r holds its elements [r * part, (r + 1) * part) at
    ``offset`` of its concatenated fp32 sub-groups."""

    offset: int
    part: int


@dataclasses.dataclass(frozen=True)
class _Module:
    """A tensor of the module copy (buffers; ZeRO-1's frozen parameters); ``to_float``: cast
    to fp32 (buffers, as zero_to_fp32 does)."""

    name: str
    to_float: bool


@dataclasses.dataclass(frozen=True)
class _Frozen:
    """A frozen parameter: its pieces, one per model-states file, joined in rank order."""

    name: str


def _natural_rank(path: Path) -> int:
    match = _OPTIM_FILE.match(path.name) or _ZERO3_MODEL_FILE.match(path.name)
    return int(match.group(2) if match.re is _OPTIM_FILE else match.group(1))


class ZeroReader(CheckpointReader):
    """One ZeRO save, read as the state dict ``zero_to_fp32`` would give, span by span.

    ``path`` may be the tag folder or the folder above it (with ``latest`` naming the tag, or
    with one tag folder). Reads copy out of the mapped files and are thread-safe."""

    thread_safe_reads = True

    def __init__(self, path: Path, allow_unsafe_pickle: bool = False):
        self.path = path
        self.tag = _tag_folder(path)
        self.config_folders = [path.parent] if self.tag == path else []  # HF Trainer: checkpoint-N/config.json
        self._allow_unsafe = allow_unsafe_pickle
        self._optim_files = self._rank_files()
        states = [self._optimizer_state(f) for f in self._optim_files]
        first = states[0]
        self.world_size = len(self._optim_files)
        counts = first.get("partition_count")
        declared = max(counts) if isinstance(counts, (list, tuple)) and counts else counts
        if not isinstance(declared, int) or declared != self.world_size:
            raise RelexError(
                f"{self.tag}: the optimizer states say {declared} data-parallel ranks but "
                f"{self.world_size} *_optim_states.pt files are here (a save interrupted, or two saves mixed)"
            )
        self.bf16_optimizer = "zero_stage" not in first
        self.stage = 1 if self.bf16_optimizer else int(first["zero_stage"])
        if self.stage not in (1, 2, 3):
            raise RelexError(f"{self._optim_files[0]}: ZeRO stage {self.stage}; only stages 1, 2 and 3 are ZeRO saves")
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        self._flat: list[list[torch.Tensor]] = []
        for file, state in zip(self._optim_files, states):
            groups = state.get(key)
            if not isinstance(groups, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in groups):
                raise RelexError(f"{file}: no {key} (a list of tensors): not a ZeRO-{self.stage} optimizer state")
            self._flat.append([t.detach().reshape(-1) for t in groups])
        paddings = first.get("param_alignment_paddings")
        del states, first  # the flat tensors keep their files mapped; the rest is dropped

        self._model_files = self._model_state_files()
        self._model_states = [self._model_state(f) for f in self._model_files]
        main = self._model_states[0]
        self.ds_version = main.get("ds_version")
        self._module = {k: v.detach() for k, v in (main.get("module") or {}).items() if isinstance(v, torch.Tensor)}
        floats = [t.dtype for t in self._module.values() if t.is_floating_point()]
        self.trainer_dtype = floats[0] if floats else torch.float32
        """The dtype the trainer's module ran in (its master weights are fp32 whatever it is)."""

        self._meta: dict[str, TensorMeta] = {}
        self._where: dict[str, _Flat | _Partitioned | _Module | _Frozen] = {}
        for name in main.get("buffer_names") or []:
            if name in self._module:
                t = self._module[name]
                self._add(
                    name, tuple(t.shape), torch.float32 if t.is_floating_point() else t.dtype, _Module(name, True)
                )
        self._index_frozen(main)
        if self.stage == 3:
            self._index_zero3(main["param_shapes"])
        else:
            self._index_zero12(main["param_shapes"], paddings)
            shared = main.get("shared_params") or {}
            for name, t in self._module.items():  # ZeRO-1 records no frozen parameters
                if name not in self._where and name not in shared and t.numel():
                    self._add(name, tuple(t.shape), t.dtype, _Module(name, False))
        for alias, target in (main.get("shared_params") or {}).items():
            if target in self._meta and alias not in self._meta:
                self._add(alias, self._meta[target].shape, self._meta[target].dtype, self._where[target])
        self._optim_maps = [FileMappings(f) for f in self._optim_files]
        self._model_maps = [FileMappings(f) for f in self._model_files]
        log.debug(
            "%s: ZeRO-%d%s, %d ranks, %d tensors, DeepSpeed %s, trainer dtype %s",
            self.tag,
            self.stage,
            " (BF16 optimizer)" if self.bf16_optimizer else "",
            self.world_size,
            len(self._meta),
            self.ds_version,
            self.trainer_dtype,
        )

    # --- opening ------------------------------------------------------------------------------

    def _load(self, file: Path):
        return load_torch_file(file, self._allow_unsafe, DEEPSPEED_TYPES)

    def _rank_files(self) -> list[Path]:
        files = [p for p in self.tag.iterdir() if _OPTIM_FILE.match(p.name)]
        if not files:
            raise RelexError(f"{self.tag}: no *zero_pp_rank_*_optim_states.pt files: not a DeepSpeed ZeRO tag folder")
        model_parallel = sorted({m.group(3) for m in map(_OPTIM_FILE.match, (p.name for p in files))} - {"00"})
        if model_parallel or any(self.tag.glob("layer_*")):
            found = f"mp_rank_{model_parallel[0]}" if model_parallel else "layer_* files"
            raise RelexError(
                f"{self.tag}: a tensor- or pipeline-parallel DeepSpeed save ({found}); "
                "only data-parallel ZeRO saves can be read"
            )
        if len({bool(_OPTIM_FILE.match(p.name).group(1)) for p in files}) > 1:
            raise RelexError(f"{self.tag}: both bf16_zero_pp_rank_* and zero_pp_rank_* files: two saves mixed")
        files.sort(key=_natural_rank)
        ranks = [_natural_rank(p) for p in files]
        if ranks != list(range(len(files))):
            missing = min(set(range(max(ranks) + 1)) - set(ranks))
            raise RelexError(f"{self.tag}: the optimizer states of rank {missing} are missing (ranks found: {ranks})")
        return files

    def _optimizer_state(self, file: Path) -> dict:
        state = self._load(file)
        inner = state.get("optimizer_state_dict") if isinstance(state, dict) else None
        if not isinstance(inner, dict):
            raise RelexError(f"{file}: no optimizer_state_dict: not a DeepSpeed ZeRO optimizer-states file")
        return inner

    def _model_state_files(self) -> list[Path]:
        if self.stage == 3:
            files = sorted((p for p in self.tag.iterdir() if _ZERO3_MODEL_FILE.match(p.name)), key=_natural_rank)
            if len(files) != self.world_size:
                raise RelexError(
                    f"{self.tag}: {len(files)} zero_pp_rank_*_model_states.pt files for {self.world_size} ranks"
                )
            return files
        file = self.tag / "mp_rank_00_model_states.pt"
        if not file.is_file():
            raise RelexError(f"{self.tag}: mp_rank_00_model_states.pt is missing (it records the parameters' shapes)")
        return [file]

    def _model_state(self, file: Path) -> dict:
        state = self._load(file)
        if not isinstance(state, dict) or not isinstance(state.get("param_shapes"), (list, tuple)):
            raise RelexError(f"{file}: no param_shapes: not a DeepSpeed model-states file")
        return state

    # --- the index ----------------------------------------------------------------------------

    def _add(self, name: str, shape, dtype: torch.dtype, where) -> None:
        self._meta[name] = TensorMeta(tuple(int(d) for d in shape), dtype)
        self._where[name] = where

    def _index_frozen(self, main: dict) -> None:
        for name, shape in (main.get("frozen_param_shapes") or {}).items():
            pieces = [state.get("frozen_param_fragments", {}).get(name) for state in self._model_states]
            if not all(isinstance(p, torch.Tensor) for p in pieces):
                raise RelexError(f"{self._model_files[0]}: frozen parameter {name} has no fragment on every rank")
            self._add(name, shape, pieces[0].dtype, _Frozen(name))

    def _index_zero12(self, param_shapes: list, paddings) -> None:
        world = self.world_size
        if len(param_shapes) != len(self._flat[0]):
            raise RelexError(
                f"{self.tag}: {len(param_shapes)} parameter groups in the model states, "
                f"{len(self._flat[0])} in the optimizer states"
            )
        for g, shapes in enumerate(param_shapes):
            sizes = [self._flat[r][g].numel() for r in range(world)]
            per_rank = sizes[0]
            if any(s != per_rank for s in sizes[:-1]) or sizes[-1] > per_rank:
                raise RelexError(f"{self.tag}: group {g}'s partitions hold {sizes} elements; expected equal ones")
            pads = paddings[g] if paddings is not None else [0] * len(shapes)
            if len(pads) != len(shapes):
                raise RelexError(f"{self._optim_files[0]}: {len(pads)} alignment paddings for {len(shapes)} parameters")
            offset = 0
            for (name, shape), pad in zip(shapes.items(), pads):
                self._add(name, shape, torch.float32, _Flat(g, offset, per_rank))
                offset += math.prod(shape) + pad
            held = sum(sizes)
            # the ranks hold the group padded to a multiple of 2 * world (ZeRO-1/2: the last
            # rank's slice without it; the BF16 optimizer: with it)
            align = 2 * world
            fits = offset <= held if self.bf16_optimizer else -(-offset // align) == -(-held // align)
            if not fits:
                raise RelexError(f"{self.tag}: group {g}'s parameters need {offset} elements, the ranks hold {held}")

    def _index_zero3(self, param_shapes: list) -> None:
        lengths = [sum(t.numel() for t in groups) for groups in self._flat]
        if len(set(lengths)) != 1:
            raise RelexError(f"{self.tag}: the ranks hold {lengths} fp32 elements; ZeRO-3 ranks hold equal partitions")
        self._group_starts = [0]
        for t in self._flat[0]:
            self._group_starts.append(self._group_starts[-1] + t.numel())
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                part = -(-math.prod(shape) // self.world_size)
                self._add(name, shape, torch.float32, _Partitioned(offset, part))
                offset += part
        if offset != lengths[0]:
            raise RelexError(
                f"{self.tag}: the parameters need {offset} elements per rank, each rank holds {lengths[0]}"
            )

    # --- the reader interface -----------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def files(self) -> list[Path]:
        return [*self._optim_files, *self._model_files]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        meta = self._meta[name]
        row = meta.numel // meta.rows if meta.shape and meta.rows else 1
        start, stop = (0, meta.rows) if rows is None or not meta.shape else rows
        shape = (stop - start, *meta.shape[1:]) if meta.shape else ()
        lo, hi = start * row, stop * row
        where = self._where[name]
        out = torch.empty(hi - lo, dtype=meta.dtype)
        if isinstance(where, _Module):
            self._copy_pieces([self._module[where.name].reshape(-1)], lo, hi, out)
        elif isinstance(where, _Frozen):
            pieces = [state["frozen_param_fragments"][where.name].reshape(-1) for state in self._model_states]
            self._copy_pieces(pieces if self.stage == 3 else pieces[:1], lo, hi, out)
        else:
            self._copy_flat(where, lo, hi, out)
        return out.reshape(shape)

    def _copy_pieces(self, pieces: list[torch.Tensor], lo: int, hi: int, out: torch.Tensor) -> None:
        """Elements [lo, hi) of the model-states files' pieces (one per file) joined end to end."""
        offset = 0
        for piece, mappings in zip(pieces, self._model_maps):
            a, b = max(lo, offset), min(hi, offset + piece.numel())
            if a < b:
                out[a - lo : b - lo].copy_(piece[a - offset : b - offset])
                mappings.release(piece, a - offset, b - offset)
            offset += piece.numel()

    def _copy_flat(self, where: _Flat | _Partitioned, lo: int, hi: int, out: torch.Tensor) -> None:
        pos = 0
        for rank, group, a, b in self._pieces(where, lo, hi):
            source = self._flat[rank][group]
            if b > source.numel():
                raise RelexError(f"{self._optim_files[rank]}: a partition is shorter than the parameters need")
            out[pos : pos + b - a].copy_(source[a:b])
            pos += b - a
            self._optim_maps[rank].release(source, a, b)
        if pos != hi - lo:
            raise RelexError(f"{self.tag}: found {pos} of {hi - lo} elements of a tensor in the partitions")

    def _pieces(self, where: _Flat | _Partitioned, lo: int, hi: int):
        """(rank, group, start, stop) runs of the flat tensors that hold elements [lo, hi)."""
        if isinstance(where, _Flat):
            start, stop, per_rank = where.offset + lo, where.offset + hi, where.per_rank
            while start < stop:
                rank = start // per_rank
                end = min(stop, (rank + 1) * per_rank)
                yield rank, where.group, start - rank * per_rank, end - rank * per_rank
                start = end
            return
        start = lo
        while start < hi:  # element e of the (padded) parameter is on rank e // part
            rank = start // where.part
            end = min(hi, (rank + 1) * where.part)
            a, b = where.offset + start - rank * where.part, where.offset + end - rank * where.part
            while a < b:  # cut at the rank's sub-group boundaries
                g = bisect.bisect_right(self._group_starts, a) - 1
                cut = min(b, self._group_starts[g + 1])
                yield rank, g, a - self._group_starts[g], cut - self._group_starts[g]
                a = cut
            start = end


def _tag_folder(path: Path) -> Path:
    """The tag folder of a ZeRO save: ``path`` itself, the tag ``latest`` names, or the one tag
    folder inside ``path``."""
    if any(_OPTIM_FILE.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or not (path / tag).is_dir():
            raise RelexError(f"{latest}: names the tag {tag!r}, which is not a folder here")
        return path / tag
    tags = sorted(p.name for p in path.iterdir() if p.is_dir() and glob_any(p, _PATTERNS[:1]))
    if len(tags) != 1:
        raise RelexError(
            f"{path}: {len(tags)} DeepSpeed tag folders ({', '.join(tags[:3])}{', ...' if len(tags) > 3 else ''}) "
            "and no `latest` file naming one; point at the tag folder itself"
        )
    return path / tags[0]


def detect(folder: Path) -> bool:
    """A ZeRO tag folder (``*zero_pp_rank_*_optim_states.pt``) or the folder above its tags."""
    return glob_any(folder, _PATTERNS)


FORMAT = CheckpointFormat(
    name="zero",
    label="DeepSpeed ZeRO",
    description="DeepSpeed ZeRO-1/2/3: *zero_pp_rank_*_optim_states.pt (the fp32 master weights)",
    priority=50,
    detect=detect,
    open=ZeroReader,
    # a tag folder; not the folder above its tags: with that, a step folder whose actor/ holds the
    # shards would itself look like a ZeRO checkpoint (HF Trainer's checkpoint-N is the step folder)
    weight_patterns=_PATTERNS[:1],
)
