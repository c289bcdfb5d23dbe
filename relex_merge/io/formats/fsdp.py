"""verl FSDP actor checkpoints: ``model_world_size_W_rank_R.pt``, one pickled state dict per rank.

FSDP2 (and FSDP1 with a device mesh) saves DTensors: ``Shard(dim)`` pieces are concatenated in
rank order, ``Replicate`` is taken once, and on a ``("ddp", "fsdp")`` mesh only the first
data-parallel replica is read. Plain tensors come from single-GPU runs (or old FSDP1 saves)
and are concatenated along dim 0. Rank files are opened with mmap, so a read touches only the
pages of the rows it needs, in the stored precision.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.base import CheckpointFormat, CheckpointReader, TensorMeta, load_torch_file

__all__ = ["FORMAT", "FsdpShardReader"]

log = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def detect(folder: Path) -> bool:
    """A folder with ``model_world_size_W_rank_R.pt`` files."""
    return folder.is_dir() and any(_RANK_FILE.match(p.name) for p in folder.iterdir())


@dataclass(frozen=True)
class _Layout:
    shard_dim: int | None  # None: replicated (or a single rank)
    local_rows: tuple[int, ...]  # size along shard_dim of each rank's piece


class FsdpShardReader(CheckpointReader):
    """A verl actor folder of rank files, read as one unsharded model. Rank files load lazily
    (rank 0 at once, for the layout); reads are not thread-safe."""

    def __init__(self, path: Path, allow_unsafe_pickle: bool = False):
        import torch.distributed.tensor  # noqa: F401  (registers DTensor for weights-only loads)

        self.path = path
        self.warnings: list[str] = []
        world = self._world_size()
        self._files = [path / f"model_world_size_{world}_rank_{r}.pt" for r in range(world)]
        self._allow_unsafe = allow_unsafe_pickle
        self._states: dict[int, dict] = {}
        first = self._state(0)
        self._ranks = self._data_ranks(first, world)
        log.debug("%s: world size %d, reading ranks %s", path, world, self._ranks)
        self._meta: dict[str, TensorMeta] = {}
        self._layout: dict[str, _Layout] = {}
        for name, value in first.items():
            if isinstance(value, torch.Tensor):
                self._describe(name, value)

    def _world_size(self) -> int:
        found: dict[int, set[int]] = {}
        for p in self.path.iterdir():
            m = _RANK_FILE.match(p.name)
            if m:
                found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        if len(found) != 1:
            raise RelexError(
                f"{self.path}: rank files of several world sizes {sorted(found)}; keep one save per folder"
            )
        world, ranks = next(iter(found.items()))
        missing = sorted(set(range(world)) - ranks)
        if missing:
            raise RelexError(f"{self.path}: missing rank file model_world_size_{world}_rank_{missing[0]}.pt")
        config_file = self.path / "fsdp_config.json"
        if config_file.is_file():
            try:
                declared = json.loads(config_file.read_text()).get("world_size")
            except ValueError as exc:
                raise RelexError(f"{config_file}: invalid JSON ({exc})") from None
            if declared is not None and int(declared) != world:
                raise RelexError(
                    f"{config_file}: world_size is {declared} but the rank files are for world size {world}"
                )
        else:
            self.warnings.append(
                f"{self.path}: no fsdp_config.json; world size {world} inferred from the rank file names"
            )
        return world

    def _state(self, rank: int) -> dict:
        if rank not in self._states:
            file = self._files[rank]
            # DeviceMesh warns about unpickling before process groups exist; we never use them
            mesh_logger = logging.getLogger("torch.distributed.device_mesh")
            level = mesh_logger.level
            mesh_logger.setLevel(logging.ERROR)
            try:
                state = load_torch_file(file, self._allow_unsafe)
            finally:
                mesh_logger.setLevel(level)
            if not isinstance(state, dict):
                raise RelexError(f"{file}: expected a state dict, found {type(state).__name__}")
            self._states[rank] = state
        return self._states[rank]

    @staticmethod
    def _data_ranks(state: dict, world: int) -> list[int]:
        """Ranks holding one full copy of the model (the first ddp replica on 2-D meshes)."""
        from torch.distributed.tensor import DTensor

        dtensor = next((v for v in state.values() if isinstance(v, DTensor)), None)
        if dtensor is None:
            return list(range(world))
        mesh = dtensor.device_mesh
        names = mesh.mesh_dim_names or ("fsdp",)
        if tuple(names) not in (("fsdp",), ("ddp", "fsdp"), ("dp", "fsdp")):
            raise RelexError(f"unsupported device mesh {names}: only fsdp and (ddp, fsdp) meshes can be read")
        grid = mesh.mesh
        return [int(r) for r in (grid if grid.dim() == 1 else grid[0]).tolist()]

    def _describe(self, name: str, first: torch.Tensor) -> None:
        from torch.distributed.tensor import DTensor

        if isinstance(first, DTensor):
            placements = tuple(first.placements)
            if len(placements) == 2:
                placements = placements[1:]  # the ddp dimension replicates
            placement = placements[0]
            if placement.is_partial():
                raise RelexError(f"{self._files[0]}: tensor {name} has a Partial placement, which cannot be read")
            shape = tuple(first.shape)
            if placement.is_replicate():
                self._layout[name] = _Layout(None, ())
            else:
                dim = placement.dim
                rows = tuple(self._local(r, name).shape[dim] for r in self._ranks)
                if sum(rows) != shape[dim]:
                    raise RelexError(
                        f"{self.path}: tensor {name} pieces add up to {sum(rows)} rows, expected {shape[dim]}"
                    )
                self._layout[name] = _Layout(dim, rows)
            self._meta[name] = TensorMeta(shape, first._local_tensor.dtype)
        elif len(self._ranks) == 1 or first.dim() == 0:
            self._layout[name] = _Layout(None, ())
            self._meta[name] = TensorMeta(tuple(first.shape), first.dtype)
        else:
            rows = tuple(self._local(r, name).shape[0] for r in self._ranks)
            self._layout[name] = _Layout(0, rows)
            self._meta[name] = TensorMeta((sum(rows),) + tuple(first.shape[1:]), first.dtype)

    def _local(self, rank: int, name: str) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        state = self._state(rank)
        if name not in state:
            raise RelexError(f"{self._files[rank]}: tensor {name} is missing (rank files disagree)")
        value = state[name]
        return (value._local_tensor if isinstance(value, DTensor) else value).detach()

    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def files(self) -> list[Path]:
        return list(self._files)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        layout = self._layout[name]
        if layout.shard_dim is None:
            whole = self._local(self._ranks[0], name)
            return (whole if rows is None or whole.dim() == 0 else whole[rows[0] : rows[1]]).clone()
        if layout.shard_dim != 0:
            # every rank holds some columns of every row: cut the rows from each (mapped) piece
            # first, so a span touches only its own rows' pages, then join along the sharded dim
            pieces = [self._local(r, name) for r in self._ranks]
            if rows is not None:
                pieces = [piece[rows[0] : rows[1]] for piece in pieces]
            return torch.cat(pieces, dim=layout.shard_dim)
        start, stop = rows if rows is not None else (0, sum(layout.local_rows))
        pieces, offset = [], 0
        for rank, n in zip(self._ranks, layout.local_rows):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                pieces.append(self._local(rank, name)[lo - offset : hi - offset])
            offset += n
        if not pieces:
            return torch.empty((0,) + self._meta[name].shape[1:], dtype=self._meta[name].dtype)
        return torch.cat(pieces, dim=0)


FORMAT = CheckpointFormat(
    name="fsdp",
    label="verl FSDP shards",
    description="verl FSDP actor shards: model_world_size_W_rank_R.pt",
    priority=30,
    detect=detect,
    open=FsdpShardReader,
    weight_patterns=("model_world_size_*_rank_*.pt",),
)
