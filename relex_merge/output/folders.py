"""Writing merged models: atomic output folders, the files a Hugging Face model needs
beside its weights, and the model card."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from relex_merge.common.errors import RelexError
from relex_merge.engine import process_group

__all__ = [
    "TOKENIZER_FILES",
    "TOKEN_NAME",
    "check_output_path",
    "atomic_output_dir",
    "shared_output_dir",
    "write_model_config",
    "copy_side_files",
    "tokenizer_folder",
    "tokenizer_folders",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _read_only_mount(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only (where access() says "no" for
    every user, root included)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): say "permission denied"
        return False


def check_output_path(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse outputs that would clobber a file, an input or an existing model."""
    resolved = out.resolve()
    for source in inputs:
        src = source.resolve()
        if src.is_dir():  # a model folder: nothing may be written into it, nor may it be replaced
            overlaps = resolved == src or _is_within(resolved, src) or _is_within(src, resolved)
        else:  # a weight file: only the file itself, or a folder holding it, would clobber it; a new
            # folder beside it (`cd run && relex-merge convert ckpt.safetensors converted`) is fine
            overlaps = _is_within(src, resolved)
        if overlaps:
            raise RelexError(f"{out}: output overlaps the input {source}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise RelexError(f"{out}: output path is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RelexError(f"{out}: output folder is not empty; pass --overwrite to replace it")
    ancestor = _existing_ancestor(out.parent)
    if not ancestor.is_dir():
        raise RelexError(f"{ancestor}: is a file, so the output folder {out} cannot be made")
    if _read_only_mount(ancestor):
        raise RelexError(f"{ancestor}: read-only file system; choose an output folder on a writable one")
    if not _writable(ancestor):
        raise RelexError(f"{ancestor}: permission denied; choose an output folder you can write to")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    Missing parent folders are made (like mkdir -p) and removed again if the merge fails.
    Without ``overwrite`` the rename claims ``out`` only if it is still missing or empty (the
    kernel's rename refuses a non-empty folder), so of two runs into one new OUT the later fails
    in one line instead of silently replacing the earlier's output.
    """
    made = []
    for parent in reversed(out.parents):
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    tmp = out.parent / f".{out.name}.relex-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as exc:
        _remove(tmp, made)
        if exc.filename is None or str(exc.filename).startswith(str(tmp)):
            raise OSError(exc.errno, exc.strerror, str(out)) from exc  # name the folder the user chose
        raise
    except BaseException:
        _remove(tmp, made)
        raise
    old = out.parent / f".{out.name}.relex-old-{os.getpid()}"
    if overwrite and out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        _remove(tmp, made)
        raise RelexError(
            f"{out}: another run wrote this output folder while this one ran; this run's output was discarded "
            "(pass --overwrite to replace it)"
        ) from None
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


TOKEN_NAME = ".relex-rank0-token"  # proves every rank sees the folder rank 0 created


@contextlib.contextmanager
def shared_output_dir(out: Path, group=None, overwrite: bool = False) -> Iterator[Path]:
    """``atomic_output_dir`` for every rank of a group: rank 0 creates the temporary folder, writes
    a token file into it, and every rank must see that token (the same file system) before any
    tensor is read; at the end every rank finishes before rank 0 renames the folder into place,
    and none returns before it is there.
    A failure on any rank removes the partial output on rank 0."""
    import secrets

    group = group or process_group.current()
    if not group.distributed:
        with atomic_output_dir(out, overwrite) as tmp:
            yield tmp
        return
    with contextlib.ExitStack() as stack:
        shared = None
        with group.step("creating the output folder"):
            if group.main:
                tmp = stack.enter_context(atomic_output_dir(out, overwrite))
                # a rank that stops answering ends this process past every finally: remove it then too
                stack.enter_context(group.cleanup_if_stopped(functools.partial(shutil.rmtree, tmp, ignore_errors=True)))
                token = secrets.token_hex(16)
                (tmp / TOKEN_NAME).write_text(token)
                shared = (tmp.name, token)
        name, token = group.broadcast(shared)
        tmp = out.parent / name
        with group.step("checking that every rank sees the output folder"):
            seen = (tmp / TOKEN_NAME).read_text() if (tmp / TOKEN_NAME).is_file() else None
            if seen != token:
                raise RelexError(
                    f"{out.parent}: this node does not see the output folder rank 0 created ({name}); every node "
                    "must write to one shared file system (give OUT on it, as an absolute path)"
                )
        yield tmp
        # the rename is part of the agreed step: no rank goes on (say, to plan a later stage that
        # reads this output) before the output is in place
        with group.step("moving the output into place"):
            if group.main:
                (tmp / TOKEN_NAME).unlink()
                stack.close()  # atomic_output_dir's exit: the rename


def _remove(tmp: Path, made_parents: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for parent in reversed(made_parents):
        with contextlib.suppress(OSError):
            parent.rmdir()  # only if still empty


def write_model_config(base_config: dict | None, dst: Path, out_dtype: str | None) -> None:
    """Write the base's config.json into ``dst``, its dtype set to ``out_dtype`` when given;
    nothing when the base has no config."""
    if base_config is None:
        return
    config = dict(base_config)
    if out_dtype is not None:
        # transformers 5 reads "dtype"; older loaders (vLLM on transformers 4) read "torch_dtype"
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def tokenizer_folders(path: Path) -> list[Path]:
    """Where ``copy_side_files`` looks for a model's tokenizer (beside it, or in huggingface/)."""
    folder = path if path.is_dir() else path.parent
    return [folder, folder / "huggingface"]


def tokenizer_folder(path: Path, also: Iterable[Path] = ()) -> Path | None:
    """The folder holding a checkpoint's tokenizer files: beside it, in huggingface/ (verl) or in
    one of ``also`` (a reader's ``config_folders``); None when it has none."""
    for folder in [*tokenizer_folders(path), *also]:
        if any((folder / n).is_file() for n in TOKENIZER_FILES):
            return folder
    return None


def copy_side_files(base: Path, tokenizer_source: Path | None, dst: Path) -> list[str]:
    """Copy generation config and tokenizer files; returns the names copied."""
    copied = []
    for folder in tokenizer_folders(base):
        gen = folder / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, dst / gen.name)
            copied.append(gen.name)
            break
    for folder in tokenizer_folders(tokenizer_source or base):
        found = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
        if found:
            for file in found:
                shutil.copy2(file, dst / file.name)
                copied.append(file.name)
            break
    return copied
