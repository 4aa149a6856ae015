"""Independent PyTorch reference for the DiLoCo recipe study (docs/RECIPE.md).

The same model as diloco-node (pre-norm, QK-LayerNorm per head, GELU MLP, learned positions,
untied head, byte vocabulary, z-loss 1e-4), the same inner AdamW (betas (0.9, 0.99), eps 1e-8,
decoupled weight decay, global grad-norm clip 1, linear warmup then cosine to 5 % indexed by the
global step), and the same outer step (outer gradient = global - local, token-weighted mean,
Nesterov SGD), written from the papers rather than from our Rust code, so that a difference
between the two is a finding and not a shared bug.

    python3 bench/torch_diloco.py --data ../shared/data/shakespeare.txt --mode diloco \
        --replicas 1 --inner-steps 20 --outer-lr 0.4 --steps 800 --init torch --json

Settings that the study varies: --init (gpt2: N(0, 0.02) with residual projections
0.02/sqrt(2L), our former default; torch: PyTorch's module defaults; others below),
--emb-std/--pos-std overrides, --mlp-bias, --wd-mask, --shards, --eval-windows.
Evaluation is ours exactly: the last 5 % of the file held out, `--eval-windows` windows evenly
spaced over it (offset i * (len - seq) / n), mean cross-entropy of the final global parameters.

`--init-from FILE` loads initial parameters from a diloco-node checkpoint (model.safetensors;
burn stores linear weights as [in, out], transposed here), and `--batches FILE` reads the exact
window offsets diloco-node samples (written by `diloco-node simulate --dump-batches FILE`), so
the two implementations can be run on identical inputs and compared step by step.
"""

import argparse
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {"tiny": (128, 4, 4, 128), "small": (512, 8, 8, 256)}
Z_LOSS = 1e-4


class Block(nn.Module):
    def __init__(self, d, h, mlp_bias):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm = nn.LayerNorm(d // h)
        self.k_norm = nn.LayerNorm(d // h)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d, bias=mlp_bias)
        self.fc2 = nn.Linear(4 * d, d, bias=mlp_bias)

    def forward(self, x, mask):
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]
        att = (q @ k.transpose(2, 3)) / math.sqrt(d // self.h)
        att = att.masked_fill(mask, -1e9).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Model(nn.Module):
    def __init__(self, d, layers, heads, ctx, mlp_bias):
        super().__init__()
        self.layers = layers
        self.tok_emb = nn.Embedding(256, d)
        self.pos_emb = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads, mlp_bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.tok_emb(x) + self.pos_emb[:t]
        for blk in self.blocks:
            h = blk(h, mask)
        return self.head(self.ln_f(h))


def loss_fn(model, w):
    logits = model(w[:, :-1]).reshape(-1, 256)
    lse = torch.logsumexp(logits, -1)
    ce = (lse - logits.gather(1, w[:, 1:].reshape(-1, 1)).squeeze(1)).mean()
    return ce + Z_LOSS * (lse ** 2).mean(), ce


def is_resid(name):
    return name.endswith("proj.weight") or name.endswith("fc2.weight")


@torch.no_grad()
def init_model(model, a, gen):
    """Initial parameters by scheme; every scheme sets LayerNorm gains 1 and shifts 0."""
    L = model.layers
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(modules.get(name.rsplit(".", 1)[0]), nn.LayerNorm):
            p.fill_(1.0 if leaf == "weight" else 0.0)
            continue
        if name == "tok_emb.weight":
            std = {"gpt2": 0.02, "torch": 1.0, "fanin": 1.0, "small": math.sqrt(2 / (5 * p.shape[1]))}[a.init]
            if a.emb_std is not None:
                std = a.emb_std
            p.normal_(0, std, generator=gen)
        elif name == "pos_emb":
            std = {"gpt2": 0.02, "torch": 1.0, "fanin": 1.0, "small": math.sqrt(2 / (5 * p.shape[1]))}[a.init]
            if a.pos_std is not None:
                std = a.pos_std
            p.normal_(0, std, generator=gen) if std > 0 else p.zero_()
        elif leaf == "bias":
            if a.init == "torch":
                # nn.Linear's bias: U(+-1/sqrt(fan_in)) of the layer it belongs to.
                layer = modules[name.rsplit(".", 1)[0]]
                bound = 1 / math.sqrt(layer.in_features)
                p.uniform_(-bound, bound, generator=gen)
            else:
                p.zero_()
        else:  # linear weights, torch layout [out, in]
            fan_in = p.shape[1]
            if a.init == "gpt2":
                std = 0.02 / math.sqrt(2 * L) if is_resid(name) else 0.02
                p.normal_(0, std, generator=gen)
            elif a.init == "torch":
                bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5))
                p.uniform_(-bound, bound, generator=gen)
            elif a.init == "fanin":
                std = 1 / math.sqrt(fan_in)
                if is_resid(name) and a.depth_scaled:
                    std /= math.sqrt(2 * L)
                p.normal_(0, std, generator=gen)
            elif a.init == "small":
                std = math.sqrt(2 / (5 * p.shape[1]))
                if is_resid(name) and a.depth_scaled:
                    std /= math.sqrt(2 * L)
                p.normal_(0, std, generator=gen)


@torch.no_grad()
def load_ours(model, path):
    """Loads a diloco-node model.safetensors (names are our module paths)."""
    from safetensors.torch import load_file

    ours = load_file(path)
    for name, p in model.named_parameters():
        key = name.replace(".weight", ".gamma") if name.endswith("weight") and p.dim() == 1 else name
        key = key.replace(".bias", ".beta") if key.endswith("bias") and "fc" not in key else key
        t = ours[key]
        if p.dim() == 2 and name != "tok_emb.weight" and name != "pos_emb":
            t = t.t()
        p.copy_(t)


def lr_at(a, step):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    decay = max(a.steps - a.warmup, 1)
    progress = min((step - a.warmup) / decay, 1.0)
    lo = a.lr * 0.05
    return lo + (a.lr - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def make_opt(model, a):
    decay, no_decay = [], []
    for p in model.parameters():
        norm_or_bias = p.dim() == 1  # LayerNorm gains and shifts, linear biases
        (no_decay if (a.wd_mask == "matrices" and norm_or_bias) else decay).append(p)
    groups = [{"params": decay, "weight_decay": a.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.99), eps=1e-8, foreach=False)


class Sampler:
    """Random windows; i.i.d. over the whole training split, or one contiguous shard each."""

    def __init__(self, train, a, replica, m):
        self.train = train
        self.seq = a.seq
        if a.shards == "contiguous" and m > 1:
            per = len(train) // m
            self.lo, self.hi = per * replica, per * (replica + 1)
        else:
            self.lo, self.hi = 0, len(train)
        self.gen = torch.Generator().manual_seed(a.seed * 1000 + replica + 1)

    def batch(self, n):
        idx = torch.randint(self.lo, self.hi - self.seq - 1 + 1, (n,), generator=self.gen)
        return torch.stack([self.train[i:i + self.seq + 1] for i in idx.tolist()])


class DumpedBatches:
    """Offsets written by `diloco-node simulate --dump-batches`: u32 header (replicas, batch per
    replica, seq), then per step and replica `batch` u32 offsets into the training split."""

    def __init__(self, path, train):
        raw = open(path, "rb").read()
        self.m, self.b, self.seq = struct.unpack_from("<3I", raw, 0)
        self.offsets = torch.frombuffer(bytearray(raw[12:]), dtype=torch.int32).long()
        self.train = train

    def batch(self, step, replica):
        base = (step * self.m + replica) * self.b
        idx = self.offsets[base:base + self.b].tolist()
        return torch.stack([self.train[i:i + self.seq + 1] for i in idx])


@torch.no_grad()
def evaluate(model, evals, seq, windows, batch):
    span = len(evals) - seq
    n = max(min(windows, span), 1)
    offs = [i * span // n for i in range(n)]
    total, count = 0.0, 0
    for c in range(0, n, batch):
        w = torch.stack([evals[o:o + seq + 1] for o in offs[c:c + batch]])
        _, ce = loss_fn(model, w)
        total += float(ce) * w.shape[0]
        count += w.shape[0]
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="tiny", choices=SIZES)
    ap.add_argument("--mode", default="diloco", choices=["diloco", "dp"])
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--outer-lr", type=float, default=0.4)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default="gpt2", choices=["gpt2", "torch", "fanin", "small"])
    ap.add_argument("--emb-std", type=float, default=None)
    ap.add_argument("--pos-std", type=float, default=None)
    ap.add_argument("--depth-scaled", type=int, default=0, help="fanin/small: residual projections / sqrt(2L)")
    ap.add_argument("--mlp-bias", type=int, default=1)
    ap.add_argument("--wd-mask", default="matrices", choices=["matrices", "all"],
                    help="matrices: no decay on LayerNorm and biases (ours); all: decay everything")
    ap.add_argument("--shards", default="iid", choices=["iid", "contiguous"])
    ap.add_argument("--eval-windows", type=int, default=1024)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--trace", action="store_true", help="print the train loss of every step")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    raw = open(a.data, "rb").read()
    cut = len(raw) - int(len(raw) * a.eval_fraction)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    train, evals = data[:cut], data[cut:]

    d, layers, heads, ctx = SIZES[a.model]
    m = a.replicas if a.mode == "diloco" else 1
    per = a.batch // a.replicas
    gen = torch.Generator().manual_seed(a.seed)
    glob = Model(d, layers, heads, ctx, bool(a.mlp_bias))
    if a.init_from:
        load_ours(glob, a.init_from)
    else:
        init_model(glob, a, gen)
    params = sum(p.numel() for p in glob.parameters())
    dumped = DumpedBatches(a.batches, train) if a.batches else None
    samplers = [Sampler(train, a, r, a.replicas) for r in range(a.replicas)]

    def batch_for(step, r):
        return dumped.batch(step, r) if dumped else samplers[r].batch(per)

    replicas = [Model(d, layers, heads, ctx, bool(a.mlp_bias)) for _ in range(m)]
    for r in replicas:
        r.load_state_dict(glob.state_dict())
    opts = [make_opt(r, a) for r in replicas]
    mom = [torch.zeros_like(p) for p in glob.parameters()]
    h = a.inner_steps if a.mode == "diloco" else a.steps
    history, t0, step, last = [], time.perf_counter(), 0, float("nan")
    while step < a.steps:
        for k in range(min(h, a.steps - step)):
            s = step + k
            lr = lr_at(a, s)
            losses = []
            for r, (model, opt) in enumerate(zip(replicas, opts)):
                if a.mode == "dp":
                    w = torch.cat([batch_for(s, q) for q in range(a.replicas)])
                else:
                    w = batch_for(s, r)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss, ce = loss_fn(model, w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(ce.item())
            last = sum(losses) / len(losses)
            if a.trace:
                print(f"step {s} loss {last:.6f}", file=sys.stderr)
        step += min(h, a.steps - step)
        if a.mode == "diloco":
            with torch.no_grad():
                for i, (g, mu) in enumerate(zip(glob.parameters(), mom)):
                    delta = sum(g - list(r.parameters())[i] for r in replicas) / m
                    mu.mul_(a.outer_momentum).add_(delta)
                    g.sub_(a.outer_lr * (delta + a.outer_momentum * mu))
                for r in replicas:
                    for pr, g in zip(r.parameters(), glob.parameters()):
                        pr.copy_(g)
        else:
            glob.load_state_dict(replicas[0].state_dict())
        if a.eval_every and step % a.eval_every == 0 and step < a.steps:
            history.append({"step": step, "eval_loss": evaluate(glob, evals, a.seq, a.eval_windows, 16)})
            print(json.dumps(history[-1]), file=sys.stderr)
    train_s = time.perf_counter() - t0
    ev = evaluate(glob, evals, a.seq, a.eval_windows, 16)
    history.append({"step": step, "eval_loss": ev})
    out = {
        "impl": "pytorch", "torch": torch.__version__, "mode": a.mode, "replicas": a.replicas,
        "inner_steps": h if a.mode == "diloco" else 1, "outer_lr": a.outer_lr, "steps": a.steps,
        "batch": a.batch, "seq": a.seq, "warmup": a.warmup, "seed": a.seed, "init": a.init,
        "emb_std": a.emb_std, "pos_std": a.pos_std, "depth_scaled": a.depth_scaled,
        "mlp_bias": a.mlp_bias, "wd_mask": a.wd_mask, "shards": a.shards,
        "init_from": a.init_from, "batches": a.batches, "eval_windows": a.eval_windows,
        "params": params, "eval_loss": ev,
        "eval_loss_128_windows": evaluate(glob, evals, a.seq, 128, 16), "train_loss": last, "train_s": train_s,
        "tokens_per_s": a.steps * a.batch * a.seq / train_s, "eval_history": history,
    }
    print(json.dumps(out) if a.json else f"eval loss {ev:.4f} after {a.steps} steps ({train_s:.0f} s)")


if __name__ == "__main__":
    main()
