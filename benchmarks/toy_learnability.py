"""Learnability probe for the toy world (a benchmark, not a test): supervised training of a
plain-PyTorch model shaped like the toy VLM (LM hidden 128 x 4 layers, vocab 512; ViT 64 x 2
layers on 8x8 patches) on the train mixture, then greedy held-out accuracy per domain and task.

It answers "does a ~1M-parameter model learn part of each domain from a few thousand examples?"
before the real warm-up (megatron model, issue 4) exists; the figures guide the task difficulty.

    PYTHONPATH=$PWD python benchmarks/toy_learnability.py --minutes 5 [--eval-items 300]
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from megatron_copd.config import VisionConfig
from megatron_copd.data.prompting import encode_prompt, encode_response
from megatron_copd.data.toy import build_toy_tokenizer, build_toy_world


class Probe(nn.Module):
    def __init__(
        self,
        vocab: int,
        image_token: int,
        d: int = 128,
        layers: int = 4,
        vd: int = 64,
        max_len: int = 256,
    ) -> None:
        super().__init__()
        self.image_token = image_token
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.patch = nn.Conv2d(3, vd, 8, 8)
        self.vpos = nn.Parameter(torch.zeros(16, vd))
        self.vit = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(vd, 4, 128, 0.0, batch_first=True, norm_first=True), 2
        )
        self.proj = nn.Sequential(nn.Linear(vd, d), nn.GELU(), nn.Linear(d, d))
        self.lm = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 4, 384, 0.0, batch_first=True, norm_first=True), layers
        )
        self.norm = nn.LayerNorm(d)
        for e in (self.emb, self.pos):  # tied head: small init keeps the first logits sane
            nn.init.normal_(e.weight, std=0.02)

    def forward(self, ids, pos, pad, pixels):
        x = self.emb(ids) + self.pos(pos)
        if pixels is not None:
            v = self.patch(pixels).flatten(2).transpose(1, 2) + self.vpos  # [n, 16, vd]
            feats = self.proj(self.vit(v)).reshape(-1, x.shape[-1])
            x = x.clone()
            x[ids == self.image_token] = feats  # row-major = batch-major, position order
        t = ids.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.lm(x, mask=causal, src_key_padding_mask=pad)
        return self.norm(h) @ self.emb.weight.t()


def batch(items, pad_id):
    """Left-padded [B, T] ids (prompt + response), positions, pad mask, loss mask, pixels."""
    seqs = [p + r for p, r, _, _ in items]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(items), t), pad_id)
    loss = torch.zeros((len(items), t), dtype=torch.bool)
    for b, ((p, r, _, _), s) in enumerate(zip(items, seqs)):
        ids[b, t - len(s) :] = torch.tensor(s)
        loss[b, t - len(r) :] = True
    pad = ids == pad_id
    pad[:, -1] = False
    pos = (~pad).long().cumsum(1).sub(1).clamp(min=0)
    pix = [x for _, _, x, _ in items if x is not None]
    return ids, pos, pad, loss, (torch.cat(pix) if pix else None)


@torch.no_grad()
def greedy(model, items, tok, max_new=4):
    out = [[] for _ in items]
    done = [False] * len(items)
    cur = [(p, [], x, m) for p, _, x, m in items]
    for _ in range(max_new):
        ids, pos, pad, _, pix = batch(
            [(p + o, [], x, m) for (p, _, x, m), o in zip(cur, out)], tok.pad_id
        )
        nxt = model(ids, pos, pad, pix)[:, -1].argmax(-1).tolist()
        for i, n in enumerate(nxt):
            if not done[i]:
                if n == tok.eos_id:
                    done[i] = True
                else:
                    out[i].append(n)
        if all(done):
            break
    return [tok.decode(o).strip() for o in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--eval-items", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--reports", type=int, default=3, help="evaluations after the first")
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    vision = VisionConfig()
    with tempfile.TemporaryDirectory() as cache:
        world = build_toy_world(cache, args.seed)
        tok = build_toy_tokenizer(world)

        def load(domain, split, limit=None):
            rows = list(world.iter_rows(domain, split))[:limit]
            base = world.path(domain, split).parent
            out = []
            for r in rows:
                e = encode_prompt(r, tok, vision, 256, base_dir=base)
                out.append(
                    (
                        e.token_ids,
                        encode_response(r["answer"], tok),
                        e.pixels,
                        (domain, r["meta"]["task"], r["answer"]),
                    )
                )
            return out

        train = {d: load(d, "train") for d in world.domains}
        evals = {d: load(d, "eval", args.eval_items) for d in world.domains}
    model = Probe(tok.vocab_size, tok.image_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(
        f"probe: {n_params / 1e6:.2f} M parameters, "
        f"{sum(len(v) for v in train.values())} train items"
    )

    def evaluate():
        model.eval()
        res = {}
        for d, items in evals.items():
            by = collections.defaultdict(lambda: [0, 0])
            for i in range(0, len(items), 100):
                chunk = items[i : i + 100]
                for pred, (_, _, _, (_, task, ans)) in zip(greedy(model, chunk, tok), chunk):
                    by[task][0] += pred == ans
                    by[task][1] += 1
            total = sum(c for c, _ in by.values()) / sum(n for _, n in by.values())
            res[d] = (total, {k: round(c / n, 2) for k, (c, n) in sorted(by.items())})
        model.train()
        return res

    start, step, losses = time.time(), 0, []
    next_report = 0.0
    while True:
        elapsed = (time.time() - start) / 60
        if elapsed >= next_report:
            r = evaluate()
            print(
                f"[{elapsed:4.1f} min, step {step}, "
                f"{step / max(elapsed * 60, 1e-9):.2f} step/s, loss "
                f"{sum(losses[-50:]) / max(1, len(losses[-50:])):.3f}] "
                + "  ".join(f"{d} {a:.1%} {per}" for d, (a, per) in r.items()),
                flush=True,
            )
            next_report += args.minutes / args.reports
            if elapsed >= args.minutes:
                break
        # One domain per batch: video prompts are ~4x longer than text, so mixing them would pad
        # every text row to video length.
        domain = world.domains[step % len(world.domains)]
        ids, pos, pad, loss_mask, pix = batch(random.sample(train[domain], args.batch), tok.pad_id)
        logits = model(ids, pos, pad, pix)
        # Predict token t+1 from position t; only response tokens carry loss.
        lp = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        m = loss_mask[:, 1:].reshape(-1).float()
        loss = (lp * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1


if __name__ == "__main__":
    main()
