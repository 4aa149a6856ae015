"""PyTorch reference for BENCHMARKS.md: the same decoder-only transformer as diloco-node
(pre-norm, QK-LayerNorm, GELU MLP, learned positions, untied head, z-loss 1e-4), the same
AdamW settings and global grad-norm clipping, trained on random windows of a byte corpus.
Prints one JSON line with tokens/s and peak RSS."""

import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {"tiny": (128, 4, 4, 128), "small": (512, 8, 8, 256), "base": (768, 18, 12, 1024)}


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm = nn.LayerNorm(d // h)
        self.k_norm = nn.LayerNorm(d // h)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        att = (q @ k.transpose(2, 3)) / math.sqrt(d // self.h)
        att = att.masked_fill(mask, -1e9).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Model(nn.Module):
    def __init__(self, d, layers, heads, ctx):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.tok(x) + self.pos[:t]
        for blk in self.blocks:
            h = blk(h, mask)
        return self.head(self.ln_f(h))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=SIZES)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    data = torch.frombuffer(bytearray(open(a.data, "rb").read()), dtype=torch.uint8).long()
    model = Model(*SIZES[a.model]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    warm = 2
    for step in range(a.steps + warm):
        if step == warm:
            t0 = time.perf_counter()
        idx = torch.randint(0, len(data) - a.seq - 1, (a.batch,), generator=gen)
        w = torch.stack([data[i:i + a.seq + 1] for i in idx]).to(dev)
        logits = model(w[:, :-1]).reshape(-1, 256)
        lse = torch.logsumexp(logits, -1)
        ce = (lse - logits.gather(1, w[:, 1:].reshape(-1, 1)).squeeze(1)).mean()
        loss = ce + 1e-4 * (lse ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "impl": "pytorch", "torch": torch.__version__, "model": a.model,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "threads": a.threads,
        "tokens_per_s": a.steps * a.batch * a.seq / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "last_loss": float(ce),
        "device": a.device,
        "gpu_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
