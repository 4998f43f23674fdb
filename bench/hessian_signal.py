"""Does HELENE's ZO diagonal Hessian carry per-coordinate information on a real model?

HELENE's A-GNB estimate is h ← β2·h + (1−β2)·c·g⊙g with g = pg·z, from the same single probe as the
gradient. For a Gaussian z, E[g_i²] = ‖∇L‖² + 2(∂ᵢL)²: the per-coordinate part is 2(∂ᵢL)² against a
common ‖∇L‖² that is on average d/2 times larger. This script measures how much of the true per-coordinate
signal survives, on the setting of docs/results.md's study 2 (SmolLM2-135M's final norm, 576 weights,
SST-2, the cross-entropy among the candidates), at the pretrained weights:

* HELENE runs with lr = 0 (θ fixed) on the same batches with two z seeds, so its m and h are estimates
  at one point; backprop on each batch gives the true gradient there;
* reported: the Pearson correlation across coordinates of h(seed a) with h(seed b) and with the true
  mean of (∂ᵢL)² over the batches (what A-GNB's per-coordinate part estimates), and of m with the true mean
  gradient; the spread of h across coordinates (CV) against the spread E[h] would have with infinitely
  many probes and the spread z's sampling noise alone gives.

    python bench/hessian_signal.py --steps 100 --threads 1 --out docs/results/hessian-signal/sst2-norm.json
    python bench/hessian_signal.py --model tiny --steps 5          # seconds; what the CI test runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convergence_run import (  # noqa: E402
    RunConfig, TrainStream, fresh_model, load_splits, model_description, training_closure,
)


def candidate_loss(model, tokenizer, examples, max_length: int) -> torch.Tensor:
    """Mean over examples of −log softmax over the candidates' log-likelihoods [gold], differentiable.
    Single-token candidates only (SST-2's " terrible"/" great"), so it equals the library's
    length-normalised candidate cross-entropy (checked against it in main)."""
    from zo_scale.data.encoding import encode_prompt_answer, pad_id
    from zo_scale.data.scoring import last_logits, takes_logits_to_keep

    contexts, cands = [], []
    for e in examples:
        enc = [encode_prompt_answer(tokenizer, e.prompt, c, max_length) for c in e.candidates]
        if any(x.num_answer_tokens != 1 or x.ids[:-1] != enc[0].ids[:-1] for x in enc):
            raise SystemExit("hessian_signal: needs single-token candidates sharing one context")
        contexts.append(enc[0].ids[:-1])
        cands.append([x.ids[-1] for x in enc])
    logits = last_logits(model, contexts, pad_id(tokenizer), 1, takes_logits_to_keep(model), "cpu")[:, -1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    scores = logp.gather(1, torch.tensor(cands))
    gold = torch.tensor([e.label for e in examples])
    return torch.nn.functional.cross_entropy(scores, gold)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def cv(x: torch.Tensor) -> float:
    """Coefficient of variation across coordinates."""
    x = x.double()
    return float(x.std() / x.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | gguf:PATH | hf:DIR")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--seed", type=int, default=13, help="data seed (batches)")
    p.add_argument("--z-seeds", type=int, nargs=2, default=[1, 2])
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import zo_scale

    t0 = time.perf_counter()
    cfg = RunConfig(run_id="", out="", task="sst2-lmbff", k=args.k, seed=args.seed, mode="norm", optimizer="helene",
                    hp={}, model=args.model, max_length=128, objective="candidates")
    train, _, _ = load_splits(cfg)
    model, tok = fresh_model(args.model, torch.float32, "cpu", "norm", {}, args.seed)
    (name, weight), = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    start = weight.detach().clone()
    opts = [zo_scale.HELENE(model, lr=0.0, eps=args.eps, seed=s) for s in args.z_seeds]
    stream = TrainStream(train, args.batch_size, args.seed)
    grads = []
    for step in range(args.steps):
        examples = stream.next()
        model.zero_grad(set_to_none=True)
        loss = candidate_loss(model, tok, examples, cfg.max_length)
        loss.backward()
        grads.append(weight.grad.detach().double().clone())
        closure = training_closure(cfg, model, tok, examples)  # what the study's HELENE runs minimise
        if step == 0:  # the differentiable loss is the library's objective (mean vs sum over examples)
            total, n = closure()
            assert math.isclose(float(total) / n, loss.item(), rel_tol=1e-4), (float(total) / n, loss.item())
        for opt in opts:
            opt.step(closure)
    # every estimate is at the pretrained point (lr = 0; fp32 restores of ±εz may move the last bit)
    assert torch.allclose(weight.detach(), start, rtol=0, atol=1e-6), "the weights moved"
    g = torch.stack(grads)  # [steps, d], per-batch true gradients at the fixed pretrained weights
    states = [next(iter(opt.shard_state.values())) for opt in opts]
    m = [st["momentum"].double() for st in states]
    h = [st["hessian"].double() for st in states]
    d = weight.numel()
    diag = g.square().mean(0)  # E_batch[(∂ᵢL)²]: A-GNB's per-coordinate part, up to the scale c
    mean_grad = g.mean(0)
    # With h_i ∝ Σ_t w_t·pg_t²·z_{t,i}², the z noise alone spreads h across coordinates by
    # CV = sqrt(Var z² · Σw²) / Σw = sqrt(2·Σw²)/Σw for EMA weights w_t = β2^(T−1−t) (pg varies too: a floor).
    beta2 = opts[0].param_groups[0]["beta2"]
    w = torch.tensor([beta2 ** (args.steps - 1 - t) for t in range(args.steps)], dtype=torch.float64)
    noise_cv = float(math.sqrt(2 * w.square().sum()) / w.sum())
    result = {
        "model": model_description(args.model), "parameter": name, "d": d, "steps": args.steps,
        "batch_size": args.batch_size, "task": f"sst2-lmbff k={args.k} seed={args.seed}", "eps": args.eps,
        "z_seeds": args.z_seeds,
        # the spread across coordinates E[h] would have with infinitely many probes, against its mean
        "cv_expected_h": float((2 * diag).std() / (g.square().sum(1).mean() + 2 * diag.mean())),
        "corr_h_a_h_b": pearson(h[0], h[1]),
        "corr_h_true_diag": [pearson(x, diag) for x in h],
        "corr_mean_h_true_diag": pearson(0.5 * (h[0] + h[1]), diag),
        "cv_h": [cv(x) for x in h], "cv_true_diag": cv(diag), "cv_z_noise_only": noise_cv,
        "corr_m_a_m_b": pearson(m[0], m[1]),
        "corr_m_true_mean_grad": [pearson(x, mean_grad) for x in m],
        "cos_per_batch_grads": float(torch.nn.functional.cosine_similarity(g[:-1], g[1:], dim=1).mean()),
        "seconds": time.perf_counter() - t0,
    }
    for key, val in result.items():
        print(f"{key:40s} {val}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
