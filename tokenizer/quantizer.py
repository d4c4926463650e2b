"""Residual vector quantizer with EMA codebooks (spec §1), plain PyTorch.

* ``depth`` codebooks of ``size`` entries each (unshared), squared-Euclidean nearest neighbour,
  no normalisation. The residual starts as a detached copy of ``z``; at each depth the nearest code
  is taken, subtracted and accumulated.
* Codebooks are not trained by gradient: EMA of assignment counts and of assigned vectors
  (decay, eps, Laplace-smoothed counts), summed over all processes before the update.
* Dead-code restart: a code whose EMA count falls below ``dead_code_threshold`` is replaced by a
  random vector of the current batch (or of a buffer of recent inputs), chosen on rank 0 and
  broadcast so that every process keeps identical codebooks.
* Commitment loss = mean over depths d of MSE(z, sg(e_1 + … + e_d)); straight-through output
  ``z + sg(q - z)``.

Each codebook's ``weight`` has ``size + 1`` rows like the released checkpoint: the last row is a
zero padding row, so a code of ``-1`` ("no code at this depth") adds nothing when looked up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def squared_distances(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``(N, C) x (K, C) -> (N, K)`` squared Euclidean distances, in float32."""
    x = x.float()
    codes = codes.float()
    return x.pow(2).sum(1, keepdim=True) - 2.0 * x @ codes.t() + codes.pow(2).sum(1)[None, :]


class EMACodebook(nn.Module):
    """One codebook of ``size`` codes of width ``dim``, updated by exponential moving averages."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.dim = dim
        weight = torch.randn(size + 1, dim)
        weight[size] = 0.0
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("cluster_size_ema", torch.zeros(size))
        self.register_buffer("embed_ema", weight[:size].clone())

    @property
    def codes(self) -> torch.Tensor:
        """The ``(size, dim)`` code vectors (padding row excluded)."""
        return self.weight[: self.size]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        return squared_distances(x, self.codes).argmin(dim=1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Vectors of codes ``idx`` (any shape); ``-1`` gives the zero padding row."""
        idx = torch.where(idx < 0, torch.full_like(idx, self.size), idx)
        return F.embedding(idx, self.weight)

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, idx: torch.Tensor, decay: float, eps: float) -> None:
        """Move counts and sums towards this batch's assignments (summed over processes)."""
        onehot = F.one_hot(idx, self.size).to(torch.float32)
        counts = onehot.sum(0)
        sums = onehot.t() @ x.float()
        if _dist_ready():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size_ema.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_ema.mul_(decay).add_(sums, alpha=1 - decay)
        self.refresh_weight(eps)

    @torch.no_grad()
    def refresh_weight(self, eps: float) -> None:
        n = self.cluster_size_ema.sum()
        smoothed = (self.cluster_size_ema + eps) / (n + self.size * eps) * n
        self.weight.data[: self.size] = self.embed_ema / smoothed.clamp_min(1e-12)[:, None]

    @torch.no_grad()
    def set_codes(self, vectors: torch.Tensor, count: float = 1.0) -> None:
        """Reset every code to ``vectors`` (``(size, dim)``), e.g. after k-means initialisation."""
        self.weight.data[: self.size] = vectors.to(self.weight.dtype)
        self.embed_ema.copy_(vectors.float() * count)
        self.cluster_size_ema.fill_(count)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (N, C) straight-through: z + sg(q - z)
    codes: torch.Tensor  # (N, depth) int64
    q: torch.Tensor  # (N, C) sum of the chosen code vectors (no gradient)
    commitment_loss: torch.Tensor  # scalar
    stats: dict = field(default_factory=dict)  # per-depth usage / perplexity / dead / restarted


class ResidualQuantizer(nn.Module):
    """``depth`` x ``codebook_size`` residual VQ over vectors of width ``dim``."""

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 256,
        depth: int = 2,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        restart_count: Optional[float] = None,
        restart_source: str = "batch",
        buffer_size: int = 4096,
    ):
        super().__init__()
        if restart_source not in ("batch", "buffer", "none"):
            raise ValueError(f"restart_source must be batch, buffer or none, got {restart_source!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.depth = depth
        self.decay = decay
        self.eps = eps
        self.dead_code_threshold = dead_code_threshold
        self.restart_count = dead_code_threshold if restart_count is None else restart_count
        self.restart_source = restart_source
        self.buffer_size = buffer_size
        self.codebooks = nn.ModuleList([EMACodebook(codebook_size, dim) for _ in range(depth)])
        # recent residual inputs per depth, for restarts from a buffer (not saved in checkpoints)
        self._recent_inputs: list[torch.Tensor] = [torch.empty(0, dim) for _ in range(depth)]

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C) -> (N, depth)`` codes."""
        residual = z.detach().float()
        codes = []
        for cb in self.codebooks:
            idx = cb.nearest(residual)
            residual = residual - cb.codes[idx].float()
            codes.append(idx)
        return torch.stack(codes, dim=1)

    def embed_codes(self, codes: torch.Tensor, minus_one_as_code0: bool = False) -> torch.Tensor:
        """``(N, d <= depth)`` codes -> ``(N, C)`` summed vectors. ``-1`` skips a depth.

        ``minus_one_as_code0`` reproduces the released code's behaviour (an aliasing bug turns
        ``-1`` into code 0 of that codebook) for exact parity with it.
        """
        if codes.dim() != 2 or codes.shape[1] > self.depth:
            raise ValueError(f"codes must be (N, <= {self.depth}), got {tuple(codes.shape)}")
        if minus_one_as_code0:
            codes = codes.clamp_min(0)
        out = None
        for d in range(codes.shape[1]):
            v = self.codebooks[d].lookup(codes[:, d])
            out = v if out is None else out + v
        return out

    # ---------------------------------------------------------------- training
    def forward(self, z: torch.Tensor, update: Optional[bool] = None) -> QuantizerOutput:
        """Quantize ``z`` (N, C). With ``update`` (default: in training mode) the codebooks move."""
        update = self.training if update is None else update
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            residual = zf.detach()
            q = torch.zeros_like(zf)
            codes, inputs, commit = [], [], []
            for cb in self.codebooks:
                idx = cb.nearest(residual)
                e = cb.codes[idx].float()
                inputs.append(residual)
                codes.append(idx)
                residual = residual - e
                q = q + e
                commit.append(F.mse_loss(zf, q.detach()))
            commitment = torch.stack(commit).mean()
            codes_t = torch.stack(codes, dim=1)
            stats = self._usage_stats(codes_t)
            if update:
                stats.update(self._update(inputs, codes))
            quantized = zf + (q - zf).detach()
        return QuantizerOutput(quantized.to(z.dtype), codes_t, q.detach(), commitment, stats)

    @torch.no_grad()
    def _usage_stats(self, codes: torch.Tensor) -> dict:
        stats = {}
        for d in range(self.depth):
            counts = torch.bincount(codes[:, d], minlength=self.codebook_size).float()
            p = counts / counts.sum().clamp_min(1)
            entropy = -(p[p > 0] * p[p > 0].log()).sum()
            stats[f"depth{d}/used_in_batch"] = float((counts > 0).sum())
            stats[f"depth{d}/perplexity"] = float(entropy.exp())
        return stats

    @torch.no_grad()
    def _update(self, inputs: list[torch.Tensor], codes: list[torch.Tensor]) -> dict:
        stats = {}
        for d, (cb, x, idx) in enumerate(zip(self.codebooks, inputs, codes)):
            cb.ema_update(x, idx, self.decay, self.eps)
            if self.restart_source == "buffer":
                self._remember(d, x)
            restarted = self._restart_dead(d, x) if self.restart_source != "none" else 0
            stats[f"depth{d}/alive"] = float((cb.cluster_size_ema >= self.dead_code_threshold).sum())
            stats[f"depth{d}/restarted"] = float(restarted)
        return stats

    def _remember(self, d: int, x: torch.Tensor) -> None:
        buf = torch.cat([self._recent_inputs[d].to(x.device), x.detach().float()], dim=0)
        self._recent_inputs[d] = buf[-self.buffer_size :]

    @torch.no_grad()
    def _restart_dead(self, d: int, x: torch.Tensor) -> int:
        cb = self.codebooks[d]
        dead = torch.nonzero(cb.cluster_size_ema < self.dead_code_threshold).flatten()
        n_dead = int(dead.numel())  # identical on every rank: the statistics were all-reduced
        if n_dead == 0:
            return 0
        pool = self._recent_inputs[d].to(x.device) if self.restart_source == "buffer" and len(self._recent_inputs[d]) else x.float()
        pick = torch.randint(0, pool.shape[0], (n_dead,), device=pool.device)
        vectors = pool[pick].contiguous()
        if _dist_ready():
            dist.broadcast(vectors, src=0)
        cb.weight.data[dead] = vectors.to(cb.weight.dtype)
        cb.embed_ema[dead] = vectors.float() * self.restart_count
        cb.cluster_size_ema[dead] = self.restart_count
        return n_dead

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 20, generator: Optional[torch.Generator] = None) -> None:
        """Initialise every codebook by k-means on ``z`` (depth by depth, on the residuals).

        Run on rank 0 and broadcast, so every process starts from the same codebooks.
        """
        residual = z.detach().float()
        for cb in self.codebooks:
            centres = kmeans(residual, self.codebook_size, iters=iters, generator=generator)
            shared = centres.to(cb.weight.device).contiguous()  # the codebook's device (NCCL needs GPU tensors)
            if _dist_ready():
                dist.broadcast(shared, src=0)
            cb.set_codes(shared, count=max(1.0, self.restart_count))
            local = shared.to(residual.device)
            residual = residual - local[squared_distances(residual, local).argmin(1)]


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Plain Lloyd k-means with k-means++-style seeding; empty clusters take a random point."""
    n = x.shape[0]
    g = generator
    if n == 0:
        raise ValueError("kmeans needs at least one vector")
    first = torch.randint(0, n, (1,), generator=g).item()
    centres = [x[first]]
    d2 = squared_distances(x, x[first : first + 1]).squeeze(1).clamp_min(0)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:
            idx = torch.randint(0, n, (1,), generator=g).item()
        else:
            idx = torch.multinomial(d2 / d2.sum(), 1, generator=g).item()
        centres.append(x[idx])
        d2 = torch.minimum(d2, squared_distances(x, x[idx : idx + 1]).squeeze(1).clamp_min(0))
    c = torch.stack(centres).clone()
    for _ in range(iters):
        assign = squared_distances(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            c[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=g)]
    return c
