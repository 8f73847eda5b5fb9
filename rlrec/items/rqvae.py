"""RQ-VAE in plain torch (TIGER: Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023).

    z = E(x);  r_0 = z;  for l = 1..L:
        code_l = argmin_k ||r_{l-1} - e_{l,k}||,   q_l = e_{l,code_l},   r_l = r_{l-1} - q_l
    z_q = sum_l q_l  (straight-through: the decoder's gradient reaches E as if z_q were z)
    loss = ||x - D(z_q)||^2 + sum_l ( ||sg[r_{l-1}] - q_l||^2 + beta * ||r_{l-1} - sg[q_l]||^2 )
Codebooks are initialised by RQ-KMeans on the encoder's output before training (TIGER's k-means init).

Two measured necessities on sentence embeddings (Scientific, MiniLM, 3 x 256):
- inputs are standardised per dimension first. Unit-norm 384-d vectors give a reconstruction MSE of about 1/384 per
  element, so the cheapest solution is a constant encoder output: all 4,344 items collapsed onto one code per
  level within 10 epochs. Standardised, reconstruction dominates and the encoder keeps items apart;
- codes unused over an epoch are re-seeded with random residuals of their level (dead-code reset). Without it the
  first level decayed from 256 to about 65 codes in use within 50 epochs; with it all 256 stay in use.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rlrec.items.quantize import Quantized, rq_kmeans
from rlrec.schema import RQVAEConfig


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, config: RQVAEConfig, sizes: list[int]) -> None:
        super().__init__()
        self.encoder = mlp([in_dim, *config.hidden, config.latent_dim])
        self.decoder = mlp([config.latent_dim, *reversed(config.hidden), in_dim])
        self.codebooks = nn.ParameterList(nn.Parameter(torch.randn(k, config.latent_dim) * 0.01) for k in sizes)
        self.beta = config.beta

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (z_q, codes [n, L], codebook loss, input residual of the last level)."""
        residual, quantized = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        last_input = residual
        for book in self.codebooks:
            last_input = residual
            code = torch.cdist(residual, book).argmin(dim=1)
            q = book[code]
            loss = loss + ((residual.detach() - q) ** 2).mean() + self.beta * ((residual - q.detach()) ** 2).mean()
            quantized = quantized + q
            residual = residual - q
            codes.append(code)
        z_q = z + (quantized - z).detach()
        return z_q, torch.stack(codes, dim=1), loss, last_input

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.encoder(x)
        z_q, codes, codebook_loss, _ = self.quantize(z)
        recon = ((self.decoder(z_q) - x) ** 2).mean()
        return recon + codebook_loss, {"recon": recon.detach(), "codebook": codebook_loss.detach(), "codes": codes}


@torch.no_grad()
def reset_dead_codes(model: RQVAE, data: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed every code no item uses with a random residual of its level; return how many were reset."""
    residual, reset = model.encoder(data), 0
    for book in model.codebooks:
        code = torch.cdist(residual, book).argmin(dim=1)
        dead = torch.nonzero(torch.bincount(code, minlength=book.shape[0]) == 0).flatten()
        if len(dead):
            book[dead] = residual[torch.randint(len(residual), (len(dead),), generator=gen)]
            code = torch.cdist(residual, book).argmin(dim=1)
            reset += len(dead)
        residual = residual - book[code]
    return reset


def train_rqvae(
    x: np.ndarray, config: RQVAEConfig, sizes: list[int], kmeans_iters: int, seed: int
) -> tuple[Quantized, dict[str, float]]:
    torch.manual_seed(seed)
    x = np.asarray(x, dtype=np.float32)
    data = torch.from_numpy((x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8))
    model = RQVAE(data.shape[1], config, sizes)
    with torch.no_grad():  # k-means initialisation of every codebook on the untrained encoder's output
        init = rq_kmeans(model.encoder(data).numpy(), sizes, kmeans_iters, seed, balanced=False)
        for book, centroids in zip(model.codebooks, init.centroids, strict=True):
            book.copy_(torch.from_numpy(centroids))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    resets = 0
    progress = tqdm(range(config.epochs), desc="rq-vae", unit="epoch", mininterval=2.0)  # minutes on a large catalogue
    for _ in progress:
        for batch in torch.randperm(len(data), generator=gen).split(config.batch_size):
            loss, _ = model(data[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        resets += reset_dead_codes(model, data, gen)
        progress.set_postfix(loss=f"{float(loss):.4f}", resets=resets, refresh=False)
    model.eval()
    with torch.no_grad():
        loss, parts = model(data)
        _, codes, _, last_input = model.quantize(model.encoder(data))
        history = {
            "loss": round(float(loss), 5),
            "recon": round(float(parts["recon"]), 5),
            "codebook": round(float(parts["codebook"]), 5),
            "dead_code_resets": resets,
        }
    books = [book.detach().numpy() for book in model.codebooks]
    return Quantized(codes.numpy(), last_input.numpy(), books), history
