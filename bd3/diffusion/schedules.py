"""Noise schedules for masked diffusion.

A schedule maps time t in [0, 1] to the mask probability ``p(t) = 1 - alpha_t`` (monotone,
p(0) ~ 0, p(1) = 1) and gives the positive NELBO weight ``w(t) = p'(t) / p(t)`` (the paper's
``-alpha'_t / (1 - alpha_t)``) that multiplies each masked token's negative log-likelihood.
Its inverse ``t_of(p)`` turns a clip interval of mask rates [beta, omega] into the range t
is drawn from, so ``--clip`` means the same mask rates under every schedule. Because t is
drawn uniformly, ``t_of`` is also the CDF of the mask rate.

Specs are strings, ``name`` or ``name:key=value:key=value`` (``gaussian:mu=0.5:sigma=0.2``).

The truncated-Gaussian and bimodal schedules follow a course team's reproduction report of
the paper (not in this repository; the README's "Noise schedules" section states them). Its bimodal p(t) is piecewise (each half of [0, 1] sweeps all of (0, 1)), which is not
monotone and makes the expected weighted loss twice the NELBO; bd3 uses the mixture's
inverse CDF instead: the same distribution of mask rates, monotone, and an unbiased NELBO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bd3.errors import Bd3Error

COSINE_EPS = 1e-3
_SQRT2 = math.sqrt(2.0)


def parse_spec(spec: str, defaults: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """``name:key=value:...`` -> (name, params with defaults filled in), checked against
    ``defaults`` (name -> default parameters)."""
    name, *parts = spec.strip().split(":")
    if name not in defaults:
        raise Bd3Error(f"Unknown name {name!r} in {spec!r}; choose one of {', '.join(defaults)}.")
    params = dict(defaults[name])
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in params:
            known = ", ".join(params) or "none"
            raise Bd3Error(f"{spec!r}: {part!r} is not key=value with a known key (for {name}: {known}).")
        try:
            params[key] = float(value)
        except ValueError:
            raise Bd3Error(f"{spec!r}: {key} must be a number, got {value!r}.") from None
    return name, params


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / _SQRT2))


def _Phi_inv(u: torch.Tensor) -> torch.Tensor:
    return _SQRT2 * torch.erfinv(2 * u - 1)


@dataclass(frozen=True)
class Schedule:
    """Base: subclasses define ``mask_prob`` and ``t_of``; ``weight`` uses ``dp_dt``."""

    spec: str

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dp_dt(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_of(self, p: torch.Tensor) -> torch.Tensor:
        """The inverse of ``mask_prob``."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """p'(t) / p(t), computed in float64 and returned in t's dtype."""
        t64 = t.double()
        return (self.dp_dt(t64) / self.mask_prob(t64)).to(t.dtype)

    def t_range(self, clip: tuple[float, float]) -> tuple[float, float]:
        """The t interval whose mask rates are ``clip``."""
        lo, hi = self.t_of(torch.tensor(clip, dtype=torch.float64)).clamp(0.0, 1.0).tolist()
        return lo, hi


@dataclass(frozen=True)
class Linear(Schedule):
    """p = t, w = 1/t. The reference calls it ``loglinear``."""

    def mask_prob(self, t):
        return t

    def dp_dt(self, t):
        return torch.ones_like(t)

    def t_of(self, p):
        return p


@dataclass(frozen=True)
class Power(Schedule):
    """p = t^k: ``square`` (k = 2, w = 2/t) and ``sqrt`` (k = 1/2, w = 1/(2t))."""

    k: float = 2.0

    def mask_prob(self, t):
        return t**self.k

    def dp_dt(self, t):
        return self.k * t ** (self.k - 1)

    def t_of(self, p):
        return p ** (1.0 / self.k)


@dataclass(frozen=True)
class Cosine(Schedule):
    """p = 1 - (1 - eps) cos(pi t / 2)."""

    def mask_prob(self, t):
        return 1 - (1 - COSINE_EPS) * torch.cos(math.pi * t / 2)

    def dp_dt(self, t):
        return (1 - COSINE_EPS) * (math.pi / 2) * torch.sin(math.pi * t / 2)

    def t_of(self, p):
        return (2 / math.pi) * torch.arccos(((1 - p) / (1 - COSINE_EPS)).clamp(-1.0, 1.0))


@dataclass(frozen=True)
class Log(Schedule):
    """p = log(1 + t) / log 2."""

    def mask_prob(self, t):
        return torch.log1p(t) / math.log(2)

    def dp_dt(self, t):
        return 1 / ((1 + t) * math.log(2))

    def t_of(self, p):
        return torch.exp2(p) - 1


@dataclass(frozen=True)
class Gaussian(Schedule):
    """Mask rates from a Gaussian(mu, sigma) truncated to [0, 1]:
    p(t) = mu + sigma * Phi^-1(Phi(a) + t Z), a = -mu/sigma, b = (1-mu)/sigma, Z = Phi(b) - Phi(a)."""

    mu: float = 0.5
    sigma: float = 0.2

    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = _Phi(torch.tensor(-self.mu / self.sigma, dtype=like.dtype))
        b = _Phi(torch.tensor((1 - self.mu) / self.sigma, dtype=like.dtype))
        return a, b - a

    def _z(self, t):
        lo, Z = self._bounds(t)
        return _Phi_inv((lo + t * Z).clamp(1e-300, 1 - 1e-16))

    def mask_prob(self, t):
        return (self.mu + self.sigma * self._z(t)).clamp(0.0, 1.0)

    def dp_dt(self, t):
        _, Z = self._bounds(t)
        return self.sigma * Z / _phi(self._z(t))

    def t_of(self, p):
        lo, Z = self._bounds(p)
        return ((_Phi((p - self.mu) / self.sigma) - lo) / Z).clamp(0.0, 1.0)

    def density(self, p: torch.Tensor) -> torch.Tensor:
        """The truncated Gaussian's density of mask rates on [0, 1]."""
        _, Z = self._bounds(p)
        return _phi((p - self.mu) / self.sigma) / (self.sigma * Z)


@dataclass(frozen=True)
class Bimodal(Schedule):
    """Mask rates from the mixture w * G(mu1, sigma1) + (1 - w) * G(mu2, sigma2) of
    truncated Gaussians: p(t) = F^-1(t) for the mixture CDF F, w(t) = 1 / (f(p) p)."""

    mu1: float = 0.3
    sigma1: float = 0.1
    mu2: float = 0.8
    sigma2: float = 0.1
    w: float = 0.6
    parts: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        g1 = Gaussian(self.spec, self.mu1, self.sigma1)
        g2 = Gaussian(self.spec, self.mu2, self.sigma2)
        object.__setattr__(self, "parts", (g1, g2))

    def t_of(self, p):
        g1, g2 = self.parts
        return self.w * g1.t_of(p) + (1 - self.w) * g2.t_of(p)

    def mask_prob(self, t):
        """Bisection on the monotone mixture CDF (60 halvings: float64 resolution)."""
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = (lo + hi) / 2
            below = self.t_of(mid) < t
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def dp_dt(self, t):
        g1, g2 = self.parts
        p = self.mask_prob(t)
        return 1 / (self.w * g1.density(p) + (1 - self.w) * g2.density(p))


SCHEDULE_DEFAULTS: dict[str, dict[str, float]] = {
    "linear": {},
    "cosine": {},
    "square": {},
    "sqrt": {},
    "log": {},
    "gaussian": {"mu": 0.5, "sigma": 0.2},
    "bimodal": {"mu1": 0.3, "sigma1": 0.1, "mu2": 0.8, "sigma2": 0.1, "w": 0.6},
}
ALIASES = {"loglinear": "linear", "square_root": "sqrt"}


def canonical(spec: str) -> str:
    """The spec with aliases resolved and every parameter spelled out."""
    name, *rest = spec.strip().split(":")
    name, params = parse_spec(":".join([ALIASES.get(name, name), *rest]), SCHEDULE_DEFAULTS)
    return ":".join([name, *(f"{k}={v:g}" for k, v in params.items())])


def get_schedule(spec: str) -> Schedule:
    spec = canonical(spec)
    name, params = parse_spec(spec, SCHEDULE_DEFAULTS)
    for key in ("sigma", "sigma1", "sigma2"):
        if key in params and params[key] <= 0:
            raise Bd3Error(f"{spec!r}: {key} must be positive.")
    if "w" in params and not 0 < params["w"] < 1:
        raise Bd3Error(f"{spec!r}: w must lie strictly between 0 and 1.")
    builders = {
        "linear": lambda: Linear(spec),
        "cosine": lambda: Cosine(spec),
        "square": lambda: Power(spec, 2.0),
        "sqrt": lambda: Power(spec, 0.5),
        "log": lambda: Log(spec),
        "gaussian": lambda: Gaussian(spec, **params),
        "bimodal": lambda: Bimodal(spec, **params),
    }
    return builders[name]()
