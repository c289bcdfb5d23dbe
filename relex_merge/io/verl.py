"""verl's FSDP actor checkpoint layout, written: full tensors cut into the rank files of a template
(the window's last checkpoint) exactly as its own shards are cut, so verl resumes from them.

A verl actor folder (``global_step_N/actor/``) holds ``model_world_size_W_rank_R.pt`` (each rank's
sharded state dict: DTensors with their mesh and placements, or plain tensors from FSDP1 without a
mesh), ``optim_world_size_W_rank_R.pt``, ``extra_state_world_size_W_rank_R.pt`` (lr scheduler,
RNG), ``fsdp_config.json`` and ``huggingface/`` (config and tokenizer; model weights when verl
was asked to save them). ``write_actor`` writes new model rank files with the same keys, the same
DTensor specs (mesh, placements, global shape and stride), the same local shapes and dtypes, and
the values of the given full tensors; everything else is copied from the template unchanged.

This is not an output format (relex_merge.io.writers): a sink receives flat spans of whole
tensors and has no template, while the rank files need the template's specs, optimizer and extra
state, and pieces along any dimension. The full tensors are read from any CheckpointReader (the
merge's own safetensors output), a rank at a time: memory is one rank file's tensors.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.base import CheckpointReader, load_torch_file

__all__ = ["Piece", "rank_files", "plan_pieces", "write_actor", "world_size", "MODEL_FILE"]

log = logging.getLogger(__name__)

MODEL_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


@dataclass(frozen=True)
class Piece:
    """Where one rank's local tensor sits in the full tensor: ``length`` entries from ``offset``
    along ``dim`` for each sharded dim (empty: the whole tensor)."""

    cuts: tuple[tuple[int, int, int], ...]  # (dim, offset, length)
    local_shape: tuple[int, ...]
    dtype: torch.dtype

    def take(self, full: torch.Tensor) -> torch.Tensor:
        out = full
        for dim, offset, length in self.cuts:
            out = out.narrow(dim, offset, length)
        return out


def rank_files(actor: Path) -> list[Path]:
    """The model rank files of a verl actor folder, in rank order (RelexError if incomplete)."""
    found: dict[int, dict[int, Path]] = {}
    for p in actor.iterdir():
        m = MODEL_FILE.match(p.name)
        if m:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    if len(found) != 1:
        what = "no model_world_size_W_rank_R.pt files" if not found else f"rank files of world sizes {sorted(found)}"
        raise RelexError(f"{actor}: {what}; expected one verl save")
    world, files = next(iter(found.items()))
    missing = sorted(set(range(world)) - set(files))
    if missing:
        raise RelexError(f"{actor}: missing rank file model_world_size_{world}_rank_{missing[0]}.pt")
    return [files[r] for r in range(world)]


def _load(file: Path, allow_unsafe_pickle: bool, mmap: bool = True) -> dict:
    import torch.distributed.tensor  # noqa: F401  (registers DTensor for weights-only loads)

    mesh_logger = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_logger.level
    mesh_logger.setLevel(logging.ERROR)  # DeviceMesh warns about unpickling without process groups
    try:
        state = load_torch_file(file, allow_unsafe_pickle, mmap=mmap)
    finally:
        mesh_logger.setLevel(level)
    if not isinstance(state, dict):
        raise RelexError(f"{file}: expected a state dict, found {type(state).__name__}")
    return state


def _local(value) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return value._local_tensor if isinstance(value, DTensor) else value


def plan_pieces(
    actor: Path, allow_unsafe_pickle: bool = False
) -> tuple[dict[str, tuple[int, ...]], list[dict[str, Piece]]]:
    """The full shape of every tensor, and per rank where each of its local tensors sits."""
    from torch.distributed.tensor import DTensor

    files = rank_files(actor)
    states = [_load(f, allow_unsafe_pickle) for f in files]
    names = [k for k, v in states[0].items() if isinstance(v, torch.Tensor)]
    for file, state in zip(files[1:], states[1:]):
        other = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
        if other != names:
            extra = sorted(set(other) ^ set(names))
            raise RelexError(
                f"{file}: tensor {extra[0] if extra else '(order)'} differs from rank 0's (rank files disagree)"
            )
    shapes: dict[str, tuple[int, ...]] = {}
    pieces: list[dict[str, Piece]] = [{} for _ in files]
    world = len(files)
    for name in names:
        first = states[0][name]
        if isinstance(first, DTensor):
            shapes[name] = tuple(first.shape)
            grid = first.device_mesh.mesh
            if grid.numel() != world:
                raise RelexError(f"{files[0]}: tensor {name} lives on a mesh of {grid.numel()} ranks, not {world}")
            placements = tuple(first.placements)
            sharded = {}  # tensor dim -> mesh dim
            for m, pl in enumerate(placements):
                if pl.is_partial():
                    raise RelexError(f"{files[0]}: tensor {name} has a Partial placement, which cannot be written")
                if pl.is_shard():
                    if pl.dim in sharded:
                        raise RelexError(
                            f"{files[0]}: tensor {name} is sharded twice along dim {pl.dim} (not supported)"
                        )
                    sharded[pl.dim] = m
            for rank in range(world):
                coord = [int(c) for c in (grid == rank).nonzero()[0]]
                cuts = []
                for dim, m in sorted(sharded.items()):
                    offset = 0
                    for j in range(coord[m]):
                        other = list(coord)
                        other[m] = j
                        offset += _local(states[int(grid[tuple(other)])][name]).shape[dim]
                    cuts.append((dim, offset, _local(states[rank][name]).shape[dim]))
                local = _local(states[rank][name])
                pieces[rank][name] = Piece(tuple(cuts), tuple(local.shape), local.dtype)
        elif world == 1 or first.dim() == 0:
            shapes[name] = tuple(first.shape)
            for rank in range(world):
                pieces[rank][name] = Piece((), tuple(first.shape), first.dtype)
        else:  # plain tensors on several ranks: concatenated along dim 0 in rank order (the reader's rule)
            offset = 0
            for rank in range(world):
                local = states[rank][name]
                pieces[rank][name] = Piece(((0, offset, local.shape[0]),), tuple(local.shape), local.dtype)
                offset += local.shape[0]
            shapes[name] = (offset,) + tuple(first.shape[1:])
        for rank in range(world):
            piece = pieces[rank][name]
            want = list(shapes[name])
            for dim, _, length in piece.cuts:
                want[dim] = length
            if tuple(want) != piece.local_shape or any(o + n > shapes[name][d] for d, o, n in piece.cuts):
                raise RelexError(
                    f"{files[rank]}: tensor {name}'s piece {piece.local_shape} does not fit {shapes[name]}"
                )
    return shapes, pieces


def write_actor(template: Path, source: CheckpointReader, out: Path, allow_unsafe_pickle: bool = False) -> list[Path]:
    """Write ``out`` (a new actor folder): the template's model rank files with ``source``'s values
    (cut and cast like the template's pieces), every other file of the template copied unchanged.
    Returns the rank files written."""
    shapes, pieces = plan_pieces(template, allow_unsafe_pickle)
    names = set(source.names())
    missing = [n for n in shapes if n not in names]
    if missing:
        raise RelexError(f"{source.path}: has no tensor {missing[0]}, which the verl checkpoint {template} holds")
    for name, shape in shapes.items():
        if tuple(source.meta(name).shape) != shape:
            raise RelexError(
                f"{source.path}: tensor {name} has shape {tuple(source.meta(name).shape)}, the verl checkpoint {shape}"
            )
    extra = sorted(names - set(shapes))
    if extra:
        log.warning(
            "%s: %d tensor(s) not in the verl checkpoint are left out (first: %s)", source.path, len(extra), extra[0]
        )
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(template.iterdir()):
        if MODEL_FILE.match(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, out / entry.name)
    from torch.distributed.tensor import DTensor

    written = []
    for rank, file in enumerate(rank_files(template)):
        state = _load(file, allow_unsafe_pickle, mmap=False)
        new = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                new[key] = value
                continue
            piece = pieces[rank][key]
            cuts = piece.cuts
            if cuts and cuts[0][0] == 0 and len(cuts) == 1:  # rows only: read just them
                _, offset, length = cuts[0]
                values = source.read(key, (offset, offset + length)) if length else _empty(source, key)
            else:
                values = piece.take(source.read(key))
            local = values.to(piece.dtype).contiguous().reshape(piece.local_shape)
            if isinstance(value, DTensor):
                new[key] = DTensor(local, value._spec, requires_grad=value.requires_grad)
            else:
                new[key] = local
        target = out / file.name
        torch.save(new, target)
        written.append(target)
        del state, new
    return written


def _empty(source: CheckpointReader, name: str) -> torch.Tensor:
    meta = source.meta(name)
    return torch.empty((0,) + tuple(meta.shape[1:]), dtype=meta.dtype)


def world_size(actor: Path) -> int:
    """The world size of a verl actor folder (its rank files), checked against fsdp_config.json."""
    world = len(rank_files(actor))
    config = actor / "fsdp_config.json"
    if config.is_file():
        try:
            declared = json.loads(config.read_text()).get("world_size")
        except ValueError as exc:
            raise RelexError(f"{config}: invalid JSON ({exc})") from None
        if declared is not None and int(declared) != world:
            raise RelexError(f"{config}: world_size is {declared} but the rank files are for world size {world}")
    return world
