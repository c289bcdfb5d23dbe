"""A toy fit family with a shape parameter no other family has (``q``): the power curve under
another name and key, so its outputs must equal ``fit: power`` with ``p`` = ``q``."""

import torch

from relex_merge.core.fits import BasisFamily, Shape


class PowQ(BasisFamily):
    name = "powq"
    formula = "c = a + b·(s − s0)^q"
    shape = Shape("q", "exponent (toy)", low=0.0, high=1.5, grid=(0.25, 0.5, 0.75))
    complexity = 3

    def basis(self, x, shape, origin, frame):
        return torch.stack([torch.ones_like(x), (x - origin).clamp_min(0.0) ** shape], 1)


FAMILY = PowQ()
