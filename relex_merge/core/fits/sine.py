"""``fit: sine`` -- c = A·sin(2π·f·s + phi) + C, the reference scripts' ``sin_fft``, for parity.

The frequency starts from the FFT peak of the centred coefficients (a periodogram on a grid when
the steps are unevenly spaced) and is refined near it; for a fixed frequency the rest is a least
squares on {1, sin, cos}, so the result is the least-squares fit nearest the FFT guess (what the
reference's curve_fit converges to). Fitted per tensor and direction; not linear in the observed
coefficients, so it costs more in backtests.
"""

from __future__ import annotations

import torch

from relex_merge.core.fits import Curve, FitFamily, r_squared

__all__ = ["FAMILY", "Sine"]

_GRID = 48  # frequencies per refinement stage
_STAGES = 10  # each narrows the search ~24x: well below float64's resolution of the phase


def _design(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(F x len(x) x 3): [1, sin, cos] at each frequency."""
    angle = 2 * torch.pi * freqs.unsqueeze(1) * x.unsqueeze(0)
    return torch.stack([torch.ones_like(angle), torch.sin(angle), torch.cos(angle)], 2)


def _residuals(x: torch.Tensor, y: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    design = _design(x, freqs)
    coef = torch.linalg.pinv(design) @ y.reshape(1, -1, 1)
    return ((design @ coef).squeeze(2) - y).pow(2).sum(1)


def _fft_guess(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(frequency, half-width of the search around it) in cycles per step."""
    n = x.numel()
    span = float(x[-1] - x[0]) or 1.0
    gaps = x[1:] - x[:-1]
    centred = y - y.mean()
    if n > 1 and bool(torch.allclose(gaps, gaps[0].expand_as(gaps))):
        spectrum = torch.fft.rfft(centred).abs()
        freqs = torch.fft.rfftfreq(n, d=float(gaps[0]))
        peak = int(spectrum[1:].argmax()) + 1 if spectrum.numel() > 1 else 0
        return float(freqs[peak]), 1.0 / (n * float(gaps[0]))
    # uneven steps: the best single frequency on a periodogram grid up to the mean Nyquist rate
    nyquist = 0.5 * (n - 1) / span
    freqs = torch.linspace(0.5 / span, max(nyquist, 0.5 / span), 4 * n, dtype=torch.float64)
    best = int(_residuals(x, centred, freqs).argmin())
    return float(freqs[best]), float(freqs[1] - freqs[0]) if freqs.numel() > 1 else 1.0 / span


def fit_frequency(x: torch.Tensor, y: torch.Tensor) -> float:
    """The least-squares frequency nearest the FFT guess: a grid around the guess, then ever finer
    grids around the best point so far."""
    guess, width = _fft_guess(x, y)
    lo, hi = max(guess - width, 0.0), guess + width
    for _ in range(_STAGES):
        freqs = torch.linspace(lo, hi, _GRID, dtype=torch.float64)
        best = int(_residuals(x, y, freqs).argmin())
        step = float(freqs[1] - freqs[0])
        guess, lo, hi = float(freqs[best]), max(float(freqs[best]) - step, 0.0), float(freqs[best]) + step
        if step <= 1e-13 * max(abs(guess), 1e-300):
            break
    return guess


class Sine(FitFamily):
    """A sinusoid per direction, for parity with the reference scripts. Not linear in the
    observed coefficients (no ``predictor``), so backtests and ``fit: auto`` fit it tensor by
    tensor."""

    name = "sine"
    formula = "c = A·sin(2π·f·s + phi) + C"
    complexity = 4

    def coefficients(self, shape):
        return 4  # A, f, phi, C

    def fit(self, steps, values, shape, origin):
        """Per column: the frequency (``fit_frequency``), then amplitude, phase and offset by least
        squares. No shape; ``origin`` is not used (the phase absorbs it)."""
        x = steps.to(torch.float64)
        columns = []
        for y in values.to(torch.float64).T:
            f = fit_frequency(x, y)
            columns.append((f, torch.linalg.pinv(_design(x, torch.tensor([f], dtype=torch.float64))[0]) @ y))

        def evaluate(at: torch.Tensor) -> torch.Tensor:
            return (
                torch.stack([_design(at, torch.tensor([f], dtype=torch.float64))[0] @ coef for f, coef in columns], 1)
                if columns
                else torch.zeros(at.numel(), 0, dtype=torch.float64)
            )

        return Curve(evaluate, r_squared(values.to(torch.float64), evaluate(x)))


FAMILY = Sine()
