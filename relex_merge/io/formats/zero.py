"""DeepSpeed ZeRO checkpoints, through DeepSpeed's own fp32 consolidation (needs `deepspeed`).

ZeRO scatters flat fp32 partitions of the optimizer state across rank files; DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` reassembles them into one fp32 state dict in RAM
(and loads the rank files to do so). There is no per-tensor access to consolidate lazily, and
the engine's spans read every checkpoint of the window in turn, so each ZeRO input of a merge
holds its whole model in fp32 for the whole merge: a window of T ZeRO checkpoints costs T fp32
models of RAM, beyond ``--max-memory`` (the reader declares it as ``resident_bytes``, and
planning warns). ``relex-merge convert`` (one checkpoint at a time) avoids it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from relex_merge.common.errors import RelexError
from relex_merge.io.base import UNREADABLE_TORCH_FILE, CheckpointFormat, StateDictReader, glob_any
from relex_merge.io.pickles import check_zero_files, forced_weights_only, refused, weights_only_refusal, zero_classes

__all__ = ["FORMAT", "zero_reader"]

log = logging.getLogger(__name__)

_PATTERNS = ("*zero_pp_rank_*_optim_states.pt", "*/*zero_pp_rank_*_optim_states.pt")


def detect(folder: Path) -> bool:
    """A ZeRO tag folder (``*zero_pp_rank_*_optim_states.pt``) or the folder above its tags."""
    return glob_any(folder, _PATTERNS)


def zero_reader(folder: Path, allow_unsafe_pickle: bool = False) -> StateDictReader:
    """The model's fp32 weights, consolidated by DeepSpeed (which loads its own pickles: every
    file is checked weights-only first, and DeepSpeed's loads run weights-only, unless trusted)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise RelexError(
            f"{folder}: a DeepSpeed ZeRO checkpoint; reading it needs DeepSpeed: pip install deepspeed "
            "(or run the zero_to_fp32.py script DeepSpeed saved beside it)"
        ) from None
    if not allow_unsafe_pickle:
        check_zero_files(folder)
    # A folder with `latest` holds tags (global_stepN/); a tag folder is read directly.
    if (folder / "latest").is_file():
        root, tag = folder, None
    else:
        root, tag = folder.parent, folder.name
    log.debug("%s: consolidating with DeepSpeed (checkpoint dir %s, tag %s)", folder, root, tag or "from latest")
    try:
        with contextlib.nullcontext() if allow_unsafe_pickle else forced_weights_only(zero_classes()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except UNREADABLE_TORCH_FILE as exc:
        if weights_only_refusal(exc):
            raise refused(folder, weights_only_refusal(exc)) from None  # DeepSpeed's own: OSError, ValueError, KeyError
        raise RelexError(f"{folder}: cannot consolidate the ZeRO checkpoint ({exc})") from None
    files = sorted(p for pattern in _PATTERNS for p in folder.glob(pattern))
    reader = StateDictReader(folder, dict(state), files)
    reader.resident_bytes = sum(tensor.nbytes for tensor in state.values())
    return reader


FORMAT = CheckpointFormat(
    name="zero",
    label="DeepSpeed ZeRO",
    description="DeepSpeed ZeRO: *zero_pp_rank_*_optim_states.pt, via DeepSpeed",
    priority=50,
    detect=detect,
    open=zero_reader,
    # a tag folder; not the folder above its tags: with that, a step folder whose actor/ holds the
    # shards would itself look like a ZeRO checkpoint (HF Trainer's checkpoint-N is the step folder)
    weight_patterns=_PATTERNS[:1],
)
