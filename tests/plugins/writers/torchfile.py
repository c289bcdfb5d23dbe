"""A toy output format: every tensor in one ``model.pt`` (torch.save), assembled in memory and
saved by ``finalize``. Single process only (it keeps the tensors in this process)."""

from pathlib import Path

import torch

from relex_merge.io.writers import OutputFormat


class TorchFileSink:
    def __init__(self, out_dir, tensors, shard_size, metadata=None, file_name=None):
        self.out_dir = Path(out_dir)
        self.file_name = file_name or "model.pt"
        self.tensors = {t.name: torch.empty(t.meta.shape, dtype=t.meta.dtype) for t in tensors}
        self.filled = dict.fromkeys(self.tensors, 0)

    @property
    def paths(self):
        return [self.out_dir / self.file_name]

    def prepare(self):
        pass

    def attach(self):
        raise RuntimeError("torchfile: single process only")

    def write_at(self, name, start, chunk):
        flat = self.tensors[name].reshape(-1)
        flat[start : start + chunk.numel()] = chunk.reshape(-1)
        self.filled[name] += chunk.numel()

    def write(self, name, chunk):
        self.write_at(name, self.filled[name], chunk)

    def close_share(self, names):
        for name in names:
            if self.filled[name] != self.tensors[name].numel():
                raise RuntimeError(f"torchfile: {name} incomplete")
        return {name: self.filled[name] for name in names}

    def finalize(self, shares):
        torch.save(self.tensors, self.paths[0])

    def abort(self):
        pass


WRITER = OutputFormat(name="torchfile", description="one model.pt (toy)", create=TorchFileSink)
