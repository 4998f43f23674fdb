"""zo_scale.memtrace: the live-bytes counter, the planner checked against traces of the real transformers
models and optimizers (fake tensors: no compute, true sizes), and the loss's logits footprint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from zo_scale.data import token_loss
from zo_scale.memtrace import LiveTensorBytes, compare, planned_total, trace_memory
from zo_scale.plan import GIB, MODELS, plan


def test_live_bytes_counts_storages_once_and_releases_them():
    counter = LiveTensorBytes()
    with counter:
        a = torch.zeros(1000)
        view = a[10:20].view(2, 5)
        assert counter.live == 4000  # a view is no new storage
        b = a * 2
        assert counter.live == 8000
        del a, view
        assert counter.live == 4000  # a's storage went with its last reference
        del b
    assert counter.live == 0 and counter.peak == 8000


def test_held_tensors_count_from_the_start_and_leave_when_freed():
    """What step_bench does on CPU: weights already alive count, and replacing one (as the official MeZO
    rebuilds param.data) frees the old storage instead of counting both for good."""
    weights = [torch.zeros(250), torch.zeros(250)]
    counter = LiveTensorBytes()
    counter.hold([weights[0], weights[0][:10], weights[1]])  # a view of a held tensor counts once
    assert counter.live == 2000
    with counter:
        for i in range(2):
            weights[i] = weights[i] + 1  # out of place: new storage, then the old one goes
    assert counter.live == 2000 and counter.peak == 3000


@pytest.mark.parametrize("model, optimizer, state_dtype, master, attention, seq", [
    ("opt-125m", "helene", "fp32", None, "sdpa", 256),
    ("opt-1.3b", "helene", "fp32", None, "sdpa", 256),
    ("opt-1.3b", "mezo", "bf16", False, "eager", 512),
    ("opt-6.7b", "hizoo", "bf16", None, "sdpa", 256),
    ("llama-2-7b", "helene", "bf16", False, "sdpa", 256),
    ("opt-13b", "mezo", "bf16", False, "eager", 2048),  # the attention scores outweigh the logits
    ("llama-2-70b", "mezo", "bf16", False, "eager", 2048),
])
def test_planner_within_ten_percent_of_the_traced_peak(model, optimizer, state_dtype, master, attention, seq):
    batch = 16 if seq <= 512 else 4
    traced, p = compare(model, batch=batch, seq=seq, optimizer=optimizer, state_dtype=state_dtype, master=master,
                              attention=attention)
    n = MODELS[model].param_count()
    assert traced.weights == 2 * n  # bf16 weights, the planner's parameter count exactly
    state_bytes = {"mezo": 0, "hizoo": 1, "helene": 2}[optimizer] * n * (4 if state_dtype == "fp32" else 2)
    assert traced.state == state_bytes + (4 * n if master is not False else 0)
    assert 0.9 <= planned_total(p) / traced.total <= 1.1, (planned_total(p) / GIB, traced.total / GIB)
    # the one estimated term on its own, not just drowned in the weights
    assert 0.9 <= p.parts["forward peak (activations)"] / traced.forward_peak <= 1.1


def test_the_trace_sees_the_kv_cache_a_forward_would_build():
    """What no_cache() saves: OPT-1.3B at batch 16 × 256 builds 2 × 24 layers × 4096 tokens × 2048 bf16
    values of KV cache that nothing reads."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zo_scale.memtrace import build_model

    peaks = {}
    for use_cache in (True, False):
        with FakeTensorMode():
            net = build_model(MODELS["opt-1.3b"], torch.bfloat16)
            counter = LiveTensorBytes()
            counter.ignore(net.parameters())
            with counter, torch.no_grad():
                ids = torch.zeros(16, 256, dtype=torch.long)
                net(input_ids=ids, use_cache=use_cache)
        peaks[use_cache] = counter.peak
    assert peaks[True] - peaks[False] == 2 * 24 * 16 * 256 * 2048 * 2


def test_whole_text_token_loss_holds_no_more_logits_than_the_planner_counts():
    """bf16 logits + one fp32 copy + log-softmax (the planner's 10 B per logit): no extra gathered copy."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 4096, (8, 33))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    counter = LiveTensorBytes()
    counter.ignore(model.parameters())
    counter.ignore(batch.values())
    with counter:
        loss_sum, n = token_loss(model, batch)
    logits = 8 * 33 * 4096
    assert n == 8 * 32
    assert counter.peak <= logits * 2 + 8 * 32 * 4096 * (4 + 4) + 2e5  # + the tiny model's activations
    with torch.no_grad():
        hf = model(**batch, use_cache=False).loss
    assert loss_sum.item() / n == pytest.approx(hf.item(), rel=1e-2)  # HF's mean, from the same bf16 logits


def test_trace_counts_the_optimizer_state_it_allocates():
    mezo = trace_memory("opt-125m", batch=1, seq=8, optimizer="mezo", master=False)
    helene = trace_memory("opt-125m", batch=1, seq=8, optimizer="helene", state_dtype="bf16", master=True)
    n = MODELS["opt-125m"].param_count()
    assert mezo.state == 0 and helene.state == n * (2 + 2 + 4)


@pytest.mark.parametrize("optimizer", ["zo-muon", "helene-muon"])
def test_subspace_optimizers_allocate_what_the_planner_counts(optimizer):
    """ZO-Muon: no state at construction (P is drawn at the first step); HELENE-Muon: M (r×n per matrix)
    and the vectors' momentum — the planner's state bytes on one process."""
    traced = trace_memory("opt-125m", batch=1, seq=8, optimizer=optimizer, master=False)
    planned = plan("opt-125m", 1, optimizer=optimizer, dtype="bf16", backend="replicated", master=False)
    assert traced.state == planned.state_bytes and (traced.state > 0) == (optimizer == "helene-muon")


@pytest.mark.parametrize("state_dtype, master", [("fp32", True), ("bf16", False)])
def test_helene_fzoo_allocates_its_momentum_as_planned(state_dtype, master):
    """HELENE-FZOO allocates one momentum per coordinate in state_dtype (and the master): the planner's bytes."""
    n = MODELS["opt-125m"].param_count()
    traced = trace_memory("opt-125m", batch=1, seq=8, optimizer="helene-fzoo", state_dtype=state_dtype, master=master)
    planned = plan("opt-125m", 1, optimizer="helene-fzoo", dtype="bf16", backend="replicated", master=master,
                   state_dtype=state_dtype)
    assert traced.state == planned.state_bytes == n * ({"fp32": 4, "bf16": 2}[state_dtype] + (4 if master else 0))


def test_cli_prints_the_comparison_and_refuses_unknown_models():
    ok = subprocess.run([sys.executable, "-m", "zo_scale.memtrace", "--model", "opt-125m", "--batch", "2"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "total (no reserve, no z chunk)" in ok.stdout and "plan/trace" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "zo_scale.memtrace", "--model", "gpt-99"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown model" in bad.stderr
