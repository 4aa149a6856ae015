"""Loads a checkpoint written by `diloco-node train` with the `safetensors` package and checks
that tensor names are module paths and shapes match the model configuration."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.numpy import load_file


def expected_tensors(d, layers, heads, context, vocab=256, mlp=4):
    hd = d // heads
    out = {"tok_emb.weight": (vocab, d), "pos_emb": (context, d)}
    for i in range(layers):
        p = f"blocks.{i}."
        out.update({
            p + "ln1.gamma": (d,), p + "ln1.beta": (d,),
            p + "qkv.weight": (d, 3 * d),
            p + "q_norm.gamma": (hd,), p + "q_norm.beta": (hd,),
            p + "k_norm.gamma": (hd,), p + "k_norm.beta": (hd,),
            p + "proj.weight": (d, d),
            p + "ln2.gamma": (d,), p + "ln2.beta": (d,),
            p + "fc1.weight": (d, mlp * d), p + "fc1.bias": (mlp * d,),
            p + "fc2.weight": (mlp * d, d), p + "fc2.bias": (d,),
        })
    out.update({"ln_f.gamma": (d,), "ln_f.beta": (d,), "head.weight": (d, vocab)})
    return out


def main():
    binary = os.environ.get("DILOCO_BIN", "target/release/diloco-node")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        cmd = [binary, "train", "--model", "d32-l2-h2-c32", "--steps", "3", "--batch", "2",
               "--seq", "32", "--backend", "cpu", "--checkpoint-dir", str(ckpt), "--json"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(f"train failed with exit code {res.returncode}")
        report = json.loads(res.stdout.strip().splitlines()[-1])
        latest = (ckpt / "LATEST").read_text().strip()
        tensors = load_file(str(ckpt / latest / "model.safetensors"))
        want = expected_tensors(32, 2, 2, 32)
        assert set(tensors) == set(want), f"names differ: {sorted(set(tensors) ^ set(want))}"
        for name, shape in want.items():
            assert tensors[name].shape == shape, f"{name}: {tensors[name].shape} != {shape}"
            assert str(tensors[name].dtype) == "float32", name
        n = sum(t.size for t in tensors.values())
        assert n == report["params"], f"{n} values vs {report['params']} params"
        state = json.loads((ckpt / latest / "state.json").read_text())
        assert state["step"] == 3 and state["global_hash"] == report["global_hash"]
        optim = load_file(str(ckpt / latest / "optimizer.safetensors"))
        assert set(optim) == {f"{k}.{s}" for k in want for s in ("exp_avg", "exp_avg_sq")}
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
