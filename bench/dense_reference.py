"""Stand-in for the paper's reference pipeline: load base and every window checkpoint into RAM
(fp32), then per tensor a full torch.linalg.svd of the T x d delta matrix, a least-squares
line through the rank-1 coefficients, and the predicted tensor; save with safetensors.

    python bench/dense_reference.py RUN_DIR T TARGET OUT
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(run: Path, window: int, target: int, out: Path) -> None:
    base = {k: v.float() for k, v in load_file(run / "base" / "model.safetensors").items()}
    checkpoints = [
        {k: v.float() for k, v in load_file(run / f"checkpoint-{s}" / "model.safetensors").items()}
        for s in range(1, window + 1)
    ]
    steps = torch.arange(1, window + 1, dtype=torch.float32)
    design = torch.stack([torch.ones_like(steps), steps], dim=1)
    result = {}
    for name, theta0 in base.items():
        m = torch.stack([(c[name] - theta0).reshape(-1) for c in checkpoints])
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        coefficients = u[:, :1] * s[:1]
        line = torch.linalg.lstsq(design, coefficients).solution
        predicted = torch.tensor([1.0, float(target)]) @ line
        result[name] = (theta0.reshape(-1) + predicted * vh[0]).reshape(theta0.shape).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
