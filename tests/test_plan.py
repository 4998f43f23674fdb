"""The memory planner: known numbers, monotonic in GPU count, clear refusals, config reading."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zo_scale.plan import GIB, MODELS, PlanError, main, plan, read_config, resolve_model, subspace_state_numbers


def test_parameter_counts_match_transformers():
    # numbers from transformers' OPTForCausalLM / LlamaForCausalLM on the meta device
    assert MODELS["opt-125m"].param_count() == 125_239_296
    assert MODELS["opt-350m"].param_count() == 331_196_416
    assert MODELS["opt-1.3b"].param_count() == 1_315_758_080
    assert MODELS["opt-66b"].param_count() == 65_719_701_504
    assert MODELS["llama-2-7b"].param_count() == 6_738_415_616
    assert MODELS["llama-2-70b"].param_count() == 68_976_648_192


def test_opt66b_zero3_eight_gpus():
    p = plan("opt-66b", 8, dtype="bf16", backend="zero3", optimizer="helene", state_dtype="fp32")
    assert p.parts["weight shard"] == pytest.approx(66e9 * 2 / 8, rel=0.01)
    assert p.parts["fp32 master shard"] == pytest.approx(66e9 * 4 / 8, rel=0.01)
    assert p.parts["optimizer state (fp32)"] == pytest.approx(2 * 66e9 * 4 / 8, rel=0.01)
    # ZeRO-3 prefetches until stage3_max_live_parameters (1e9 elements) are gathered: more than the embedding
    assert 1e9 * 2 <= p.parts["gathered parameters"] <= 1.7e9 * 2
    # the peak is inside a layer: the eager attention's scores (16 × 72 heads × 256², bf16 + 2 fp32) and q, k, v, out
    residual, tokens = 2 * 16 * 256 * 9216 * 2, 16 * 256
    attention = tokens * 4 * 9216 * 2 + 16 * 72 * 256 * 256 * (2 + 8)
    assert p.parts["forward peak (activations)"] == residual + attention
    assert not p.fits  # 18 B per parameter over 8 GPUs is > 80 GiB
    lean = plan("opt-66b", 8, optimizer="helene", state_dtype="bf16", master=False)
    assert lean.fits and lean.total_bytes < 60 * GIB
    assert plan("opt-66b", 8, optimizer="mezo").fits


def test_state_by_optimizer_and_master_default():
    kw = dict(dtype="bf16", state_dtype="fp32")
    mezo, hizoo, helene, fzoo = (plan("opt-1.3b", 1, optimizer=o, **kw) for o in ("mezo", "hizoo", "helene", "fzoo"))
    assert fzoo.parts["optimizer state (fp32)"] == 0 and fzoo.total_bytes == mezo.total_bytes  # no state, as MeZO
    n = MODELS["opt-1.3b"].param_count()
    assert [x.parts["optimizer state (fp32)"] for x in (mezo, hizoo, helene)] == [0, 4 * n, 8 * n]
    assert mezo.master and mezo.parts["fp32 master shard"] == 4 * n
    fp32 = plan("opt-1.3b", 1, dtype="fp32", optimizer="mezo")
    assert not fp32.master and fp32.parts["fp32 master shard"] == 0


@pytest.mark.parametrize("backend, gpus", [("replicated", 1), ("fsdp2", 4), ("zero3", 4)])
def test_helene_fzoo_keeps_one_momentum_sharded_like_the_weights(backend, gpus):
    """HELENE-FZOO: FZOO's probes (N + 1 = 9 groups, N an option) plus HELENE's momentum m, one tensor shaped like
    the shard in state_dtype; batched probes allowed on shards (FZOO's direction needs nothing sharded)."""
    kw = dict(dtype="bf16", backend=backend)
    fzoo, hf = plan("opt-1.3b", gpus, optimizer="fzoo", **kw), plan("opt-1.3b", gpus, optimizer="helene-fzoo", **kw)
    shard = hf.parts["weight shard"] // 2
    assert hf.parts["optimizer state (fp32)"] == 4 * shard and fzoo.parts["optimizer state (fp32)"] == 0
    assert hf.total_bytes - fzoo.total_bytes == 4 * shard and hf.state_bytes == (4 + 4) * shard  # m + master
    bf16 = plan("opt-1.3b", gpus, optimizer="helene-fzoo", state_dtype="bf16", **kw)
    assert bf16.parts["optimizer state (bf16)"] == 2 * shard and "momentum: 1×bf16 state" in bf16.report()
    batched = plan("opt-1.3b", gpus, optimizer="helene-fzoo", batched_probes=True, n_directions=3, **kw)
    if gpus > 1:
        assert "(4 probe groups in it)" in batched.notes[0]
    else:  # one process: the 4 groups' activations, as one forward of 4 micro-batches
        assert batched.parts["forward peak (activations)"] == plan(
            "opt-1.3b", 1, optimizer="mezo", batch=4 * 16, **kw).parts["forward peak (activations)"]


def test_helene_fzoo_n_directions_from_a_config(tmp_path):
    """A config's optimizer.n_directions reaches the planner for helene-fzoo, as for fzoo (not for other optimizers)."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": {"name": "opt-1.3b"}, "optimizer": {"name": "helene-fzoo", "n_directions": 3,
                                                                           "batched_probes": True}}))
    assert read_config(cfg)["n_directions"] == 3
    cfg.write_text(json.dumps({"model": {"name": "opt-1.3b"}, "optimizer": {"name": "helene", "n_directions": 3}}))
    assert "n_directions" not in read_config(cfg)


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
@pytest.mark.parametrize("model", ["opt-13b", "llama-2-70b"])
def test_monotonic_in_gpu_count(backend, model):
    totals = [plan(model, g, backend=backend).total_bytes for g in (1, 2, 4, 8, 16, 64)]
    shards = [plan(model, g, backend=backend).parts["weight shard"] for g in (2, 4, 8, 16, 64)]
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert all(a > b for a, b in zip(shards, shards[1:]))


def test_fsdp2_gathers_the_root_and_three_layer_units():
    """At a layer's copy-out FSDP2 holds the root unit (embeddings, final norm) gathered, the previous
    all-gather's flat buffer, this one's, and this layer's parameters (dim 0 padded to the world size)."""
    shape = MODELS["opt-66b"]
    p = plan("opt-66b", 8, backend="fsdp2", batch=1)
    positions = -(-(shape.max_positions + 2) // 8) * 8  # 2050 rows padded to 2056
    root = (shape.vocab * shape.hidden + positions * shape.hidden + 2 * shape.hidden) * 2
    assert p.parts["gathered parameters"] == root + 3 * shape.layer_params() * 2
    assert plan("opt-66b", 1, backend="replicated").parts["gathered parameters"] == 0


def test_eager_attention_costs_more_than_sdpa():
    eager = plan("opt-1.3b", 1, batch=16, seq=2048, attention="eager")
    sdpa = plan("opt-1.3b", 1, batch=16, seq=2048, attention="sdpa")
    assert eager.parts["forward peak (activations)"] > sdpa.parts["forward peak (activations)"]
    assert "forward peak: attention" in eager.notes[-1] and "forward peak: logits + loss" in sdpa.notes[-1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="opt-66b", gpus=0), "gpus must be a positive integer"),
        (dict(model="opt-66b", gpus=2.5), "gpus must be a positive integer"),
        (dict(model="opt-66b", gpus=8, batch=-1), "batch must be a positive integer"),
        (dict(model="opt-66b", gpus=8, dtype="fp8"), "unknown dtype"),
        (dict(model="opt-66b", gpus=8, optimizer="adam"), "unknown optimizer"),
        (dict(model="opt-66b", gpus=8, backend="zero2"), "unknown backend"),
        (dict(model="opt-66b", gpus=8, seq=4096), "exceeds opt-66b's 2048 positions"),
        (dict(model="opt-66b", gpus=8, gpu_mem_gib=0), "gpu memory must be positive"),
        (dict(model="gpt-5", gpus=8), "unknown model"),
    ],
)
def test_refuses_nonsense(kwargs, message):
    model, gpus = kwargs.pop("model"), kwargs.pop("gpus")
    with pytest.raises(PlanError, match=message):
        plan(model, gpus, **kwargs)


def test_model_names_and_hf_config(tmp_path):
    assert resolve_model("facebook/opt-66b") is MODELS["opt-66b"]
    assert resolve_model("meta-llama/Llama-2-70b-hf") is MODELS["llama-2-70b"]
    cfg = {"model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32,
           "ffn_dim": 8192, "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(tmp_path).param_count() == MODELS["opt-1.3b"].param_count()
    assert resolve_model(tmp_path / "config.json").param_count() == MODELS["opt-1.3b"].param_count()


def test_config_file_and_flags(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": {"name": "opt-13b"}, "dtype": "bf16", "backend": "fsdp2",
                               "optimizer": {"name": "hizoo", "state_dtype": "bf16"},
                               "data": {"batch_size": 8, "max_length": 512}, "unrelated": 1}))
    kw = read_config(cfg)
    assert kw == {"model": "opt-13b", "dtype": "bf16", "backend": "fsdp2", "optimizer": "hizoo",
                  "state_dtype": "bf16", "batch": 8, "seq": 512}
    assert main(["--config", str(cfg), "--gpus", "4", "--optimizer", "mezo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["optimizer"], out["backend"], out["batch"], out["seq"], out["gpus"]) == ("mezo", "fsdp2", 8, 512, 4)
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "zo_scale.plan", "--model", "opt-66b", "--gpus", "8",
                           "--optimizer", "mezo"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "weight shard" in proc.stdout and "FITS" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "zo_scale.plan", "--gpus", "8"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "say which model" in bad.stderr


def test_subspace_optimizers_keep_rows_of_p_and_a_replicated_momentum():
    """opt-1.3b, r = 64: per layer Σ r·n = 64·(4·2048 + 2048 + 8192), Σ m·r = 64·(4·2048 + 8192 + 2048);
    embeddings (50272×2048) and positions (2050×2048) are matrices too."""
    k = subspace_state_numbers(MODELS["opt-1.3b"], 64)
    assert k["momentum"] == 64 * (24 * 18432 + 2 * 2048) and k["basis"] == 64 * (24 * 18432 + 50272 + 2050)
    zm = plan("opt-1.3b", 1, optimizer="zo-muon", dtype="fp32", backend="replicated")
    hm = plan("opt-1.3b", 4, optimizer="helene-muon", dtype="fp32", backend="fsdp2")
    assert zm.parts["subspace bases: P rows (fp32)"] == 4 * k["basis"] and "optimizer state: M (replicated)" not in zm.parts
    assert hm.parts["optimizer state: M (replicated)"] == 4 * k["momentum"]  # the same on 1 or 4 GPUs
    assert hm.parts["optimizer state (fp32)"] == 4 * -(-k["vectors"] // 4)  # the vectors' momentum is sharded
    assert zm.state_bytes == 0 and hm.state_bytes == 4 * k["momentum"] + 4 * -(-k["vectors"] // 4)
    assert subspace_state_numbers(MODELS["opt-1.3b"], 4096)["basis"] > k["basis"]  # r = min(rank, m) per matrix
