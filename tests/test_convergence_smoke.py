"""bench/convergence.py: the --smoke study runs end to end on CPU, and its evaluation (CandidateScorer:
the library's candidate scoring on examples encoded once, with the dev loss from the same pass) agrees
with the library's token_loss, candidate_scores and predict_candidates."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BENCH / "convergence.py"), "--smoke", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=180)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, elapsed


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_study_is_fast(smoke_out):
    _, _, elapsed = smoke_out
    assert elapsed < 60, f"smoke study took {elapsed:.0f} s"


def test_run_files_are_well_formed(smoke_out):
    out, _, _ = smoke_out
    runs = sorted((out / "runs").glob("*.jsonl"))
    assert runs and not list((out / "runs").glob("*.partial"))
    for path in runs:
        recs = _records(path)
        assert recs[0]["type"] == "config" and recs[-1]["type"] == "final"
        cfg, final = recs[0], recs[-1]
        assert 0.0 <= final["test_acc"] <= 1.0 and cfg["n_test"] == 24
        evals = [r for r in recs if r["type"] == "eval"]
        assert evals and evals[0]["fwd"] == 0 and 0.0 <= evals[0]["dev_acc"] <= 1.0
        if cfg["optimizer"] == "zeroshot":
            continue
        steps = [r for r in recs if r["type"] == "step"]
        per_step = {"hizoo": 3, "fzoo": 9}.get(cfg["optimizer"], 2)  # FZOO: ℓ₀ + 8 probes
        # the same forward budget for every optimizer: as many whole steps as fit
        assert final["fwd"] == (cfg["budget"] // per_step) * per_step or final["diverged"]
        assert [s["fwd"] for s in steps] == [per_step * (i + 1) for i in range(len(steps))]
        assert evals[-1]["fwd"] == final["fwd"]
        assert [e["fwd"] for e in evals] == sorted(e["fwd"] for e in evals)
        if cfg["optimizer"] == "helene":
            assert all(0.0 <= s["clip_fraction"] <= 1.0 for s in steps)


def test_aggregates(smoke_out):
    out, stdout, _ = smoke_out
    summary = json.loads((out / "summary.json").read_text())
    assert {z["task"] for z in summary["zeroshot"]} == {"sst2-lmbff", "trec"}
    main = {(m["task"], m["mode"], m["optimizer"]) for m in summary["main"]}
    assert main == {(t, m, o) for t in ("sst2-lmbff", "trec") for m in ("full", "lora")
                    for o in ("mezo", "hizoo", "helene", "fzoo")}
    for m in summary["main"]:
        assert 0.0 <= m["test_acc_mean"] <= 1.0 and m["test_acc_std"] >= 0.0 and m["seeds"] == [13]
    # speedup rows: HiZOO, HELENE and FZOO against MeZO, by dev accuracy and by dev loss, to MeZO's final
    # and to its best evaluation
    assert len(summary["speedup"]) == 4 * 3 * 2 * 2
    for p in summary["speedup"]:
        assert p["metric"] in ("dev acc", "dev loss") and p["mark"] in ("final", "best") and len(p["per_seed"]) == 1
        sp = p["per_seed"][0]
        if sp["speedup"] is not None:
            assert sp["speedup"] == pytest.approx(sp["mezo_fwd"] / sp["fwd"])
    variants = {a["variant"] for a in summary["ablation"]}
    assert variants == {"default", "anneal_off", "clip_none", "hessian_off", "clip_floor", "hscale_const"}
    changes = {a["variant"]: a["changes"] for a in summary["ablation"]}
    assert changes["clip_none"] == {"clip_mode": "none"} and changes["hessian_off"] == {"use_hessian": False}
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection["sst2-lmbff|4|full|mezo"]["grid"]) == 2  # the two-point MeZO grid was compared
    md = (out / "summary.md").read_text()
    assert "Zero-shot floor" in md and "HELENE ablation" in md and "speedup" in md


def test_plots_are_pngs(smoke_out):
    out, _, _ = smoke_out
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["plots"]) == 4 + 1  # (task, mode) curves + one ablation plot
    import matplotlib.image as mpimg

    for rel in summary["plots"]:
        path = out / rel
        assert path.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 600


def test_rerun_resumes_without_repeating(smoke_out):
    out, _, _ = smoke_out
    proc = subprocess.run([sys.executable, str(BENCH / "convergence.py"), "--smoke", "--device", "cpu",
                           "--out", str(out), "--report-only"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, str(BENCH / "convergence.py"), "--smoke", "--device", "cpu",
                           "--out", str(out), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count(" done") > 0
    assert all(line.endswith("done") for line in proc.stdout.splitlines() if line.startswith(("grid", "zeroshot")))


def test_fast_paths_match_the_library():
    sys.path.insert(0, str(BENCH))
    try:
        from convergence_run import CandidateScorer, fresh_model
    finally:
        sys.path.remove(str(BENCH))
    from zo_scale.data import causal_lm_batch, get_task, token_loss
    from zo_scale.data.scoring import candidate_scores
    from zo_scale.evaluate import predict_candidates

    lora = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
    for mode in ("full", "lora"):
        model, tok = fresh_model("tiny", torch.float32, "cpu", mode, lora, seed=0)
        for task in ("sst2-lmbff", "trec", "sst5"):  # single-token and multi-token candidates
            ex = get_task(task).examples("train", k_per_class=2, seed=1)
            scorer = CandidateScorer(tok, ex, batch_size=5)
            fast = scorer.scores(model)
            ref = candidate_scores(model, tok, ex, batch_size=4)
            for a, b in zip(fast, ref):
                assert a == pytest.approx(b, abs=1e-4)
            preds = predict_candidates(model, tok, ex)
            acc = sum(p in e.gold_indices for p, e in zip(preds, ex)) / len(ex)
            assert scorer.accuracy(model) == pytest.approx(acc)
            # the one-pass dev loss is token_loss over the whole set (answer tokens, token-weighted)
            acc, loss = scorer.evaluate(model)
            s_ref, n_ref = token_loss(model, causal_lm_batch(tok, ex))
            assert loss == pytest.approx(float(s_ref) / n_ref, rel=1e-4)


def test_norm_mode_and_candidates_objective():
    """mode 'norm' trains the final norm only; the 'candidates' objective's dev loss is the trainer's
    candidate cross-entropy, and its training closure is that same function."""
    sys.path.insert(0, str(BENCH))
    try:
        from convergence_run import CandidateScorer, RunConfig, fresh_model, training_closure
    finally:
        sys.path.remove(str(BENCH))
    from zo_scale.data import get_task
    from zo_scale.trainer.objectives import candidate_cross_entropy

    model, tok = fresh_model("tiny", torch.float32, "cpu", "norm", {}, seed=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.norm.weight"]
    ex = get_task("sst5").examples("train", k_per_class=2, seed=1)
    total, n = candidate_cross_entropy(model, tok, ex)
    _, dev_loss = CandidateScorer(tok, ex, batch_size=4).evaluate(model, "candidates")
    assert dev_loss == pytest.approx(float(total) / n, rel=1e-6)
    cfg = RunConfig(run_id="", out="", task="sst5", k=2, seed=1, mode="norm", optimizer="mezo", hp={},
                    objective="candidates")
    closure_total, closure_n = training_closure(cfg, model, tok, ex)()
    assert closure_n == n and float(closure_total) == pytest.approx(float(total), rel=1e-6)  # other batching


def test_dev_limit_takes_a_balanced_subset_not_a_prefix():
    """k-per-class dev lists are in sampling order: SST-2's first 100 dev examples at k=512 held 99
    positives, which made the zero-shot 'always great' model look 75-81 % accurate on dev."""
    sys.path.insert(0, str(BENCH))
    try:
        from convergence_run import RunConfig, load_splits
    finally:
        sys.path.remove(str(BENCH))
    cfg = RunConfig(run_id="", out="", task="sst2-lmbff", k=512, seed=13, mode="norm", optimizer="mezo", hp={},
                    dev_limit=100, test_limit=300)
    _, dev, test = load_splits(cfg)
    assert len(dev) == 100 and len(test) == 300
    assert 35 <= sum(e.label for e in dev) <= 65


def test_speedup_to_mezos_final_and_to_its_best_evaluation(monkeypatch):
    """Study 4: MeZO peaked at 72 % and fell back to 62 %; the 'best' mark asks for the peak."""
    monkeypatch.syspath_prepend(str(BENCH))
    import convergence

    def run(accs, losses):
        evals = [{"fwd": 250 * i, "dev_acc": a, "dev_loss": l} for i, (a, l) in enumerate(zip(accs, losses))]
        return {"evals": evals, "final": {"dev_acc": accs[-1], "dev_loss": losses[-1]}}

    mezo = {13: run([0.48, 0.59, 0.72, 0.62], [1.3, 0.8, 0.56, 0.73])}
    other = {13: run([0.48, 0.65, 0.70, 0.84], [1.3, 0.7, 0.6, 0.44])}
    (final,) = convergence.speedups(mezo, other, "acc", True, "final")
    assert (final["target"], final["mezo_fwd"], final["fwd"]) == (0.62, 500, 250) and final["speedup"] == 2.0
    (best,) = convergence.speedups(mezo, other, "acc", True, "best")
    assert (best["target"], best["mezo_fwd"], best["fwd"], best["speedup"]) == (0.72, 500, 750, 500 / 750)
    (best_loss,) = convergence.speedups(mezo, other, "loss", False, "best")
    assert (best_loss["target"], best_loss["mezo_fwd"], best_loss["fwd"]) == (0.56, 500, 750)
    # a MeZO that never beat its start has no mark to reach, whichever mark
    flat = {13: run([0.48, 0.40, 0.45], [1.3, 1.4, 1.35])}
    for mark in ("final", "best"):
        (rec,) = convergence.speedups(flat, other, "acc", True, mark)
        assert rec["speedup"] is None and rec["note"] == "MeZO did not improve on its start"
    (unreached,) = convergence.speedups(mezo, {13: run([0.48, 0.5, 0.55, 0.6], [1.3, 1.2, 1.1, 1.0])},
                                        "acc", True, "best")
    assert unreached["fwd"] is None and unreached["note"] == "not reached within the budget"


def test_selection_by_dev_accuracy_or_by_dev_loss(tmp_path, monkeypatch):
    """Study 2's lesson: on 100 dev sentences a noisy accuracy lead can beat a much lower dev loss.
    --select-by acc keeps the accuracy rule; --select-by loss picks the lowest dev loss; an unstable
    point (dev loss above its start) ranks last under both rules."""
    monkeypatch.syspath_prepend(str(BENCH))
    import convergence

    cfg = convergence.resolve(convergence.build_parser().parse_args(
        ["--smoke", "--device", "cpu", "--out", str(tmp_path), "--tasks", "sst2-lmbff", "--modes", "full",
         "--optimizers", "mezo", "--grid", "mezo.full:lr=1,2,3:eps=1e-3"]))
    # lr=1: noisy accuracy lead, high loss; lr=2: lower accuracy, lowest loss; lr=3: best of both, unstable
    finals = {1: (0.67, 1.01), 2: (0.64, 0.66), 3: (0.90, 0.10)}
    for lr, (acc, loss) in finals.items():
        rc = convergence.run_config(cfg, task="sst2-lmbff", k=4, seed=13, mode="full", optimizer="mezo",
                                    hp={"eps": 1e-3, "lr": lr}, budget=cfg["grid_budget"], role="grid")
        start_loss = 0.05 if lr == 3 else 1.2
        recs = [{"type": "config"}, {"type": "eval", "fwd": 0, "dev_acc": 0.5, "dev_loss": start_loss},
                {"type": "eval", "fwd": 12, "dev_acc": acc, "dev_loss": loss},
                {"type": "final", "dev_acc": acc, "dev_loss": loss, "test_acc": 0.5, "diverged": False}]
        Path(rc.out).parent.mkdir(parents=True, exist_ok=True)
        Path(rc.out).write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    assert cfg["select_by"] == "acc"
    assert convergence.select(cfg)["sst2-lmbff|4|full|mezo"]["hp"]["lr"] == 1
    cfg["select_by"] = "loss"
    sel = convergence.select(cfg)["sst2-lmbff|4|full|mezo"]
    assert sel["hp"]["lr"] == 2 and sel["select_by"] == "loss"
    assert [g["hp"]["lr"] for g in sel["grid"]] == [2, 1, 3] and sel["grid"][-1]["unstable"]


def test_run_ids_are_stable_and_a_task_revision_retires_old_runs(monkeypatch):
    """Finished runs are reused by id: committed runs keep their ids, and a task whose answers changed
    (TREC's 3-token " Abbreviation" -> " Expression") gets new ids, so its old runs are not reused."""
    monkeypatch.syspath_prepend(str(BENCH))
    import convergence

    cfg = convergence.resolve(convergence.build_parser().parse_args(
        ["--preset", "cpu-long", "--out", "docs/results/cpu-long"]))
    ids = {t: convergence.run_config(cfg, task=t, k=512, seed=13, mode="lora", optimizer="mezo",
                                     hp={"eps": 1e-2, "lr": 1e-3}).run_id for t in ("sst2-lmbff", "trec")}
    assert ids["sst2-lmbff"] == "sst2-lmbff_k512_s13_lora_mezo_eps0.01_lr0.001_F2000_49f0a26e"  # committed
    assert ids["trec"].startswith("trec_k512_s13_lora_mezo_eps0.01_lr0.001_F2000_")
    assert ids["trec"] != "trec_k512_s13_lora_mezo_eps0.01_lr0.001_F2000_311539f3"  # revision 1's id


@pytest.mark.parametrize("optimizer, schedule", [
    ("fzoo", {}), ("fzoo", {"lr_schedule": "cosine"}),
    # P resampled every 2 steps: the stop (after step 4) falls at a resample, so the resumed run projects M
    ("helene-muon", {"lr_schedule": "cosine", "rank": 4, "resample_every": 2}),
    ("helene-fzoo", {"lr_schedule": "cosine"}),  # its momentum must come back with the checkpoint
])
def test_interrupted_run_resumes_from_its_checkpoint_on_the_same_trajectory(tmp_path, monkeypatch, optimizer,
                                                                            schedule):
    """A run stopped after its second checkpoint and started again ends with the same records as a run
    that was never stopped (timings aside), and leaves no checkpoint behind; an lr schedule continues."""
    monkeypatch.syspath_prepend(str(BENCH))
    import convergence_run as cr

    def cfg(out):
        return cr.RunConfig(run_id="r", out=str(out), task="sst2-lmbff", k=4, seed=13, mode="lora", optimizer=optimizer,
                            hp={"lr": 1e-2, "eps": 1e-3, "n_directions": 3, **schedule}, budget=24, eval_every=8,
                            batch_size=4,
                            model="tiny", test_limit=8, max_length=64, eval_batch_size=8, threads=1)

    whole = cfg(tmp_path / "whole.jsonl")
    cr.execute(whole)
    stopped = cfg(tmp_path / "stopped.jsonl")
    save, saves = cr.save_run_checkpoint, []

    def save_then_stop(*a, **kw):
        save(*a, **kw)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the session ends here
    monkeypatch.setattr(cr, "save_run_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cr.execute(stopped)
    assert cr.checkpoint_path(stopped).is_file() and not Path(stopped.out).exists()
    # records written after the checkpoint (none here: it is saved right after its eval) would be dropped
    with open(stopped.out + ".partial", "a") as f:
        f.write(json.dumps({"type": "step", "step": 99}) + "\n")
    monkeypatch.setattr(cr, "save_run_checkpoint", save)
    cr.execute(stopped)
    assert not cr.checkpoint_path(stopped).exists()

    def comparable(path):
        drop = {"elapsed_s", "train_s", "eval_s", "s_per_step", "total_s", "resumed", "started", "out"}
        return [{k: v for k, v in r.items() if k not in drop} for r in _records(Path(path))]

    assert comparable(stopped.out) == comparable(whole.out)
    assert _records(Path(stopped.out))[-1]["resumed"] is True
    lrs = [r.get("lr") for r in _records(Path(stopped.out)) if r["type"] == "step"]
    if schedule:  # 6 steps of 4 forwards, cosine from 1e-2 towards 0
        assert lrs == pytest.approx([1e-2 * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)])
    else:
        assert lrs == [None] * 6
