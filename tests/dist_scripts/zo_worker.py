"""One rank of the sharded-backend checks (launched by torchrun; run as plain python for the
single-process reference). Usage:

    torchrun --nproc_per_node W tests/dist_scripts/zo_worker.py --out DIR --checks a,b,... [--ckpt DIR]
    python tests/dist_scripts/zo_worker.py --out DIR --checks ref
    ... --optimizers HiZOOL     the optimizer loops over these instead of common.OPTIMIZERS

Rank 0 writes ``DIR/results_w{W}.pt``: a dict check-key -> record. Any exception ends the rank at
once (its peers then fail their next collective within the gloo timeout), so a broken check
fails the launch instead of hanging it.

Checks
  ref         plain single-process trajectories (the reference), K steps and the RESUME_AT point
  traj        trajectories: fsdp2 (default root), fsdp2k (layers kept gathered + forward prefetch),
              fsdp2p (fsdp2k + an async unshard pending at each step), zero3 (threshold 0),
              zero3d (DeepSpeed's default threshold), hsdp / hsdpr ((1, W) / (W, 1) meshes), ddp
  batched     as traj, but one batched forward per closure (reduction-order noise included)
  probes      as ref / traj with batched_probes=True (every probe group in one forward), plain / fsdp2 / zero3
  fused       HiZOO / HELENE / FZOO through the fused Triton kernels (CPU interpreter), FUSED_STEPS steps
  layout      every rank's (name, start, numel) for FSDP2 and ZeRO-3 views
  negative    the traps with prepare_edit disabled (must NOT match the reference)
  coll        collectives issued during opt.step vs the same number of bare forwards (and with batched_probes)
  bf16        +eps z, -2 eps z, restore leaves bf16 shards bit-identical (fp32 master)
  reload      opt.load_state_dict on a live bf16 model replays the same steps
  ckpt_save   RESUME_AT steps, then save optimizer state + full weights  (run at W=2)
  ckpt_load   load on another world size and backend, finish the K steps (run at W=3)
  probes_save RESUME_AT steps with batched_probes=True, then save as ckpt_save (run at W=2)
  probes_load load a batched save into batched runs on other backends and into a sequential replicated
              one, and a sequential save into a batched run; finish the K steps (W=3; W=1: plain models)
  refuse      ZeRO-3 parameter offload engine and FSDP2 Shard(1) placements are refused
  fsdp1       FSDP1 (use_orig_params=True) trajectory; use_orig_params=False refused
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import common  # noqa: E402

common.quiet()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from zo_scale.distributed import destroy_distributed, exit_on_error, init_distributed  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# collective counting: every ProcessGroup method call, whatever Python API (torch, FSDP2's
# all_gather_single, deepspeed.comm) issued it


COLLECTIVE_METHODS = (
    "allreduce", "allreduce_coalesced", "broadcast", "allgather", "allgather_coalesced",
    "allgather_into_tensor_coalesced", "_allgather_base", "all_gather_single", "all_gather_single_coalesced",
    "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_single", "reduce_scatter_single_coalesced",
    "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base", "all_to_all_single", "gather", "scatter",
    "reduce", "send", "recv", "recv_anysource", "barrier", "monitored_barrier",
)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CollectiveCounter:
    def __init__(self):
        self.active = False
        self.log: list[tuple[str, int]] = []
        from torch._C._distributed_c10d import ProcessGroup

        for name in COLLECTIVE_METHODS:
            if hasattr(ProcessGroup, name):
                setattr(ProcessGroup, name, self._wrap(name, getattr(ProcessGroup, name)))

    def _wrap(self, name, orig):
        counter = self

        def method(pg, *args, **kwargs):
            if counter.active:
                # all-reduce is in place: its tensors are the payload; for the rest only the
                # count and a consistent size measure matter (compared step vs bare forwards)
                counter.log.append((name, _nbytes(args)))
            return orig(pg, *args, **kwargs)

        return method

    def measure(self, fn):
        self.log, self.active = [], True
        try:
            fn()
        finally:
            self.active = False
        return list(self.log)


def summarize(log):
    out = {}
    for name, nbytes in log:
        kind = "allreduce" if name.startswith("allreduce") else name
        c, b = out.get(kind, (0, 0))
        out[kind] = (c + 1, b + nbytes)
    return out


# ---------------------------------------------------------------------------------------------
# building wrapped models


def build(backend: str, arch: str, dtype=torch.float32, weights: dict | None = None):
    model = common.build_model(arch, dtype)
    if weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n].to(p.dtype))
    if backend == "plain":
        return model
    if backend == "fsdp2":
        return common.wrap_fsdp2(model)
    if backend in ("fsdp2k", "fsdp2p"):  # layers kept gathered after forward + explicit forward prefetch
        return common.wrap_fsdp2(model, keep_layers=True)
    if backend in ("hsdp", "hsdpr"):  # 2-D mesh: (1, W) shards over all ranks, (W, 1) replicates
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        shape = (1, world) if backend == "hsdp" else (world, 1)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        return common.wrap_fsdp2(model, mesh=mesh)
    if backend == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if backend == "zero3":
        return common.wrap_zero3(model, threshold=0, bf16=dtype == torch.bfloat16)
    if backend == "zero3d":  # DeepSpeed's default stage3_param_persistence_threshold
        return common.wrap_zero3(model, threshold=None, bf16=dtype == torch.bfloat16)
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for i, layer in enumerate(list(model.layers())):
            model.layers()[i] = FSDP(layer, use_orig_params=True, device_id=torch.device("cpu"))
        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    raise ValueError(backend)


def run_steps(opt, closure, n, before_step=None):
    recs = []
    for _ in range(n):
        if before_step is not None:
            before_step()
        opt.step(closure)
        recs.append(common.step_record(opt))
    return recs


def _factors(opt):
    """HiZOOL's R and C (whole on every rank), or None for the other optimizers."""
    if not hasattr(opt, "factors"):
        return None
    return {k: {s: f[s].clone() for s in ("rows", "cols")} for k, f in opt.factors.items()}


def _whole_hessians(opt):
    """HiZOOL's H of unfactored tensors where this rank keeps it whole (batched on shards, or a replicated model)."""
    if opt.whole_hessian:
        return {k: h.clone() for k, h in opt.whole_hessian.items()}
    return {v.name: opt.shard_state[v.name]["hessian"].clone() for v in opt.views
            if v.name not in opt.factors and v.numel == v.global_numel}


class Runner:
    def __init__(self, rank, world, out: Path, ckpt: Path | None, optimizers=common.OPTIMIZERS):
        self.rank, self.world, self.out, self.ckpt = rank, world, out, ckpt
        self.optimizers = tuple(optimizers)
        default = self.optimizers == common.OPTIMIZERS
        self.bf16_optimizers = ("MeZO", "HELENE", "ZOMuon") if default else self.optimizers
        self.reload_optimizer = "HiZOO" if default else self.optimizers[0]
        self.results = {}
        self.timings = {}
        self._counter = None

    def put(self, key, value):
        self.results[key] = value

    def closure(self, model, per_sequence=True):
        return common.make_closure(model, self.rank, self.world, per_sequence=per_sequence)

    def trajectory(self, backend, arch, opt_name, n=common.K_STEPS, weights=None, ckpt_in=None, per_sequence=True,
                   **opt_kw):
        model = build(backend, arch, weights=weights)
        opt = common.make_optimizer(opt_name, model, **opt_kw)
        if ckpt_in is not None:
            from zo_scale.checkpoint import load_optimizer_state

            opened = load_optimizer_state(opt, ckpt_in)
        else:
            opened = None
        before = None
        if backend == "fsdp2p":  # an all-gather still pending when the step starts (issued pre-edit)
            def before():
                for layer in model.layers():
                    layer.unshard(async_op=True)
        closure = self.closure(model, per_sequence)
        recs = run_steps(opt, closure, 1, before)
        first = _factors(opt)
        recs += run_steps(opt, closure, n - 1, before)
        rec = {"losses": recs, "params": common.full_params(model), "opened": opened}
        if first is not None:  # HiZOOL: R, C are whole (and identical) on every rank
            rec.update(factors_first=first, factors=_factors(opt))
            if opt.batched_probes:  # the whole H of unfactored tensors, and whether every rank holds the same
                rec["whole_hessian"] = _whole_hessians(opt)
                every = [rec["whole_hessian"]]
                if self.world > 1:
                    every = [None] * self.world
                    dist.all_gather_object(every, rec["whole_hessian"])
                rec["whole_hessian_same"] = all(set(e) == set(every[0]) and all(torch.equal(e[k], every[0][k]) for k in e)
                                                for e in every)
        return model, opt, rec

    # ---------------------------------------------------------------- checks

    def check_ref(self):
        for arch in common.ARCHS:
            for name in self.optimizers:
                model = build("plain", arch)
                opt = common.make_optimizer(name, model)
                closure = self.closure(model)
                recs = run_steps(opt, closure, 1)
                first = _factors(opt)
                recs += run_steps(opt, closure, common.RESUME_AT - 1)
                mid = common.full_params(model)
                recs += run_steps(opt, closure, common.K_STEPS - common.RESUME_AT)
                rec = {"losses": recs, "params": common.full_params(model), "mid_params": mid}
                if first is not None:
                    rec.update(factors_first=first, factors=_factors(opt))
                self.put(("traj", name, arch, "plain"), rec)

    def check_traj(self):
        for backend in ("fsdp2", "fsdp2k", "fsdp2p", "zero3", "zero3d", "hsdp", "hsdpr", "ddp"):
            for arch in common.ARCHS:
                for name in self.optimizers:
                    _, _, rec = self.trajectory(backend, arch, name)
                    self.put(("traj", name, arch, backend), rec)

    def check_batched(self):
        """Batched forwards (one forward per closure): losses then differ in the last bits between
        world sizes (matmul shapes change), which is what real runs see."""
        backends = ("plain",) if self.world == 1 else ("fsdp2", "zero3")
        for backend in backends:
            for name in self.optimizers:
                _, _, rec = self.trajectory(backend, "llama", name, per_sequence=False)
                self.put(("batched", name, "llama", backend), rec)

    def check_probes(self):
        """batched_probes=True: every probe group in one forward (zo_scale.probes), per-sequence closure as
        the reference; HiZOO needs whole parameters, so on sharded backends its refusal is recorded."""
        backends = ("plain",) if self.world == 1 else ("fsdp2", "zero3")
        for backend in backends:
            for arch in common.ARCHS:
                for name in self.optimizers:
                    try:
                        _, _, rec = self.trajectory(backend, arch, name, batched_probes=True)
                    except ValueError as e:
                        if backend == "plain":
                            raise
                        rec = {"refused": str(e)}
                    self.put(("probes", name, arch, backend), rec)
            if "HiZOOL" in self.optimizers and backend != "plain":
                # a matrix left unfactored is not replicated; HiZOO's refusal names HiZOOL
                for key, name, kw in (("hizool_unfactored_matrix", "HiZOOL", {"factored_min_dim": 10**9}),
                                      ("hizoo_batched", "HiZOO", {})):
                    try:
                        common.make_optimizer(name, build(backend, "llama"), batched_probes=True, **kw)
                        msg = None
                    except ValueError as e:
                        msg = str(e)
                    self.put(("refuse", key, backend), msg)
            if self.optimizers != common.OPTIMIZERS:
                continue
            for arch in common.MORE_ARCHS:  # Gemma, RoBERTa: MeZO, against the sequential run of this world
                for batched in (False, True):
                    _, _, rec = self.trajectory(backend, arch, "MeZO", n=2, batched_probes=batched)
                    self.put(("probes" if batched else "traj", "MeZO", arch, backend), rec)

    def check_fused(self):
        """The fused Triton kernels (in Triton's CPU interpreter) on shards: z is generated in-kernel
        from each view's global start, so shards must reproduce the single-process run."""
        env = {"ZO_SCALE_TRITON_CPU": "1", "TRITON_INTERPRET": "1"}
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            # Triton decides at import whether @triton.jit functions are interpreted
            raise RuntimeError("check_fused must run before anything imports triton (main() runs it first)")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            from zo_scale import kernels

            if not kernels.available():
                self.put(("fused", "unavailable"), True)
                return
            backends = ("plain",) if self.world == 1 else ("fsdp2", "zero3")
            for backend in backends:
                for name in ("HiZOO", "HELENE", "FZOO"):
                    _, opt, rec = self.trajectory(backend, "llama", name, n=common.FUSED_STEPS)
                    rec["used_kernels"] = all(opt._uses_kernels(v) for v in opt.views)
                    self.put(("fused", name, "llama", backend), rec)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def check_layout(self):
        for backend in ("fsdp2", "zero3"):
            for arch in common.ARCHS:
                model = build(backend, arch)
                opt = common.make_optimizer("MeZO", model)
                mine = [(v.name, v.start, v.numel, v.global_numel) for v in opt.views]
                every = [None] * self.world
                dist.all_gather_object(every, mine)
                self.put(("layout", arch, backend), every)

    def check_negative(self):
        """Disable prepare_edit: the ZeRO-3 persistent / FSDP2 root traps must then bite."""
        for backend in ("zero3d", "fsdp2"):
            model = build(backend, "opt")
            opt = common.make_optimizer("MeZO", model)
            opt.backend.prepare_edit = lambda: None
            recs = run_steps(opt, self.closure(model), common.K_STEPS)
            self.put(("negative", backend), {"losses": recs, "params": common.full_params(model)})

    def check_coll(self):
        counter = self._counter or CollectiveCounter()
        self._counter = counter
        for backend in ("fsdp2", "zero3d", "zero3"):
            for name in self.optimizers:
                model = build(backend, "llama")
                opt = common.make_optimizer(name, model)
                closure = self.closure(model)
                run_steps(opt, closure, 2)  # past ZeRO-3's trace recording (forwards 1-2)
                step_log = counter.measure(lambda: opt.step(closure))
                n_fwd = opt.last_stats.forward_passes // opt.step_count  # forwards of one step

                def bare():
                    for _ in range(n_fwd):
                        opt.backend.prepare_edit()
                        with torch.no_grad():
                            closure()

                base_log = counter.measure(bare)

                def bare_no_release():  # what the forwards would gather if nothing were released
                    for _ in range(n_fwd):
                        with torch.no_grad():
                            closure()

                noedit_log = counter.measure(bare_no_release)
                self.put(("coll", backend, name), {"step": summarize(step_log), "bare": summarize(base_log),
                                                   "bare_no_release": summarize(noedit_log), "n_fwd": n_fwd,
                                                   "batched": self._batched_step_log(counter, backend, name)})

    def _batched_step_log(self, counter, backend, name):
        """Collectives of one step with batched_probes=True (None where the optimizer refuses it)."""
        model = build(backend, "llama")
        try:
            opt = common.make_optimizer(name, model, batched_probes=True)
        except ValueError:
            return None
        closure = self.closure(model)
        run_steps(opt, closure, 2)
        return summarize(counter.measure(lambda: opt.step(closure)))

    def check_bf16(self):
        for backend in ("fsdp2", "zero3d", "zero3"):
            for name in self.bf16_optimizers:
                model = build(backend, "opt", dtype=torch.bfloat16)
                opt = common.make_optimizer(name, model)
                closure = self.closure(model)
                before = [v.local.clone() for v in opt.views]
                dtypes = sorted({str(v.local.dtype) for v in opt.views})
                with torch.no_grad():
                    l0 = opt._forward(closure).tolist()
                rounds = []
                for r in range(3):  # 3 rounds: past the 3rd forward, where ZeRO-3 keeps params gathered
                    opt._move_to(+1, 0)
                    with torch.no_grad():
                        lp = opt._forward(closure).tolist()
                    opt._move_to(-1, 0)
                    with torch.no_grad():
                        lm = opt._forward(closure).tolist()
                    opt._move_to(0, 0)
                    with torch.no_grad():
                        lr = opt._forward(closure).tolist()
                    same = all(torch.equal(a, v.local) for a, v in zip(before, opt.views))
                    rounds.append({"bit_identical": same, "loss_restored": lr, "loss_plus": lp, "loss_minus": lm})
                run_steps(opt, closure, 2)
                cast_ok = all(torch.equal(v.local, opt.shard_state[v.name]["master"].to(v.local.dtype))
                              for v in opt.views)
                ok = torch.tensor([float(all(r["bit_identical"] for r in rounds) and cast_ok)])
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                self.put(("bf16", backend, name), {"rounds": rounds, "loss0": l0, "cast_master_ok": cast_ok,
                                                   "all_ranks_ok": bool(ok.item()), "dtypes": dtypes,
                                                   "master": opt.master_weights})

    def check_reload(self):
        """opt.load_state_dict on a live sharded model (bf16 + fp32 master, HiZOO: its l0 forward
        comes before any edit of the step): replaying a step after reloading the state gives the
        same losses bit for bit, so the master copied into the shards was not hidden by gathered
        copies (ZeRO-3 persistent parameters, the FSDP2 root)."""
        for backend in ("zero3d", "fsdp2"):
            model = build(backend, "opt", dtype=torch.bfloat16)
            opt = common.make_optimizer(self.reload_optimizer, model)
            closure = self.closure(model)
            run_steps(opt, closure, 2)
            sd = opt.flat_state_dict()  # copies (state_dict() holds the live tensors, as torch's does)
            first = run_steps(opt, closure, 2)
            with torch.no_grad():  # an evaluation forward: gathers (and ZeRO-3/FSDP2 root keep) the weights
                closure()
                closure()
            opt.load_state_dict(sd)
            again = run_steps(opt, closure, 2)
            self.put(("reload", backend), {"first": first, "again": again})

    def check_ckpt_save(self):
        from zo_scale.checkpoint import save_optimizer_state

        for backend in ("fsdp2", "zero3"):
            for name in self.optimizers:
                d = self.ckpt / f"{name}-{backend}"
                _, opt, rec = self.trajectory(backend, "llama", name, n=common.RESUME_AT)
                save_optimizer_state(opt, d)
                if self.rank == 0:
                    torch.save(rec["params"], d / "model.pt")
                dist.barrier()
                self.put(("ckpt_save", backend, name), {"losses": rec["losses"], "params": rec["params"]})

    def check_ckpt_load(self):
        for src, dst in (("fsdp2", "zero3"), ("zero3", "fsdp2"), ("fsdp2", "fsdp2")):
            for name in self.optimizers:
                d = self.ckpt / f"{name}-{src}"
                weights = torch.load(d / "model.pt")
                _, opt, rec = self.trajectory(dst, "llama", name, n=common.K_STEPS - common.RESUME_AT,
                                              weights=weights, ckpt_in=d)
                rec["step_count"] = opt.step_count
                opened = [None] * self.world
                dist.all_gather_object(opened, rec["opened"])
                rec["opened"] = opened
                self.put(("ckpt_load", src, dst, name), rec)

    def check_probes_save(self):
        from zo_scale.checkpoint import save_optimizer_state

        for backend in ("fsdp2", "zero3"):
            for name in self.optimizers:
                d = self.ckpt / f"{name}-{backend}-probes"
                _, opt, rec = self.trajectory(backend, "llama", name, n=common.RESUME_AT, batched_probes=True)
                save_optimizer_state(opt, d)
                if self.rank == 0:
                    torch.save(rec["params"], d / "model.pt")
                dist.barrier()
                if backend == "fsdp2":  # torch's layout (what DCP saves): the vectors' whole H as a plain tensor
                    self.put(("probes_torch_layout", name), self._torch_layout_round_trip(name, opt))

    def _torch_layout_round_trip(self, name, opt):
        fresh = common.make_optimizer(name, build("fsdp2", "llama"), batched_probes=True)
        fresh.load_state_dict(opt.state_dict())
        same = all(torch.equal(fresh.whole_hessian[k], h) for k, h in opt.whole_hessian.items())
        sequential = common.make_optimizer(name, build("fsdp2", "llama"))
        try:  # a sharded (DTensor) H handed over directly cannot fill a whole one without a gather
            fresh.load_state_dict(sequential.state_dict())
            msg = None
        except ValueError as e:
            msg = str(e)
        return {"same": same and bool(opt.whole_hessian), "from_dtensor": msg}

    def check_probes_load(self):
        """(save, destination backend, batched_probes at the destination) for the last K - RESUME_AT steps."""
        if self.world == 1:
            cases = (("fsdp2-probes", "plain", False), ("zero3-probes", "plain", True))
        else:
            cases = (("fsdp2-probes", "zero3", True), ("zero3-probes", "fsdp2", True), ("fsdp2-probes", "ddp", False),
                     ("zero3", "fsdp2", True))
        for src, dst, batched in cases:
            for name in self.optimizers:
                d = self.ckpt / f"{name}-{src}"
                weights = torch.load(d / "model.pt")
                _, opt, rec = self.trajectory(dst, "llama", name, n=common.K_STEPS - common.RESUME_AT,
                                              weights=weights, ckpt_in=d, batched_probes=batched)
                rec["step_count"] = opt.step_count
                self.put(("probes_load", src, dst, batched, name), rec)

    def check_refuse(self):
        from zo_scale.optim import MeZO

        model = common.build_model("opt")
        engine = common.wrap_zero3(model, threshold=0, offload_param={"device": "cpu"})
        try:
            MeZO(engine, lr=1e-3)
            msg = None
        except ValueError as e:
            msg = str(e)
        self.put(("refuse", "offload_param"), msg)

        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        def dim1(p):  # FSDP2 sharding on dim 1: a rank's rows are not one contiguous flat range
            return Shard(1) if p.dim() == 2 and p.shape[1] % self.world == 0 else None

        model = common.build_model("llama")
        for layer in model.layers():
            fully_shard(layer, shard_placement_fn=dim1)
        fully_shard(model)
        try:
            MeZO(model, lr=1e-3)
            msg = None
        except NotImplementedError as e:
            msg = str(e)
        self.put(("refuse", "fsdp2_shard1"), msg)

    def check_fsdp1(self):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from zo_scale.shards import trainable_named_parameters

        for name in ("MeZO", "HELENE"):
            model = build("fsdp1", "llama")
            opt = common.make_optimizer(name, model)
            recs = run_steps(opt, self.closure(model), common.K_STEPS)
            opt.backend.prepare_edit()
            with FSDP.summon_full_params(model):  # FSDP1's own gather, not our views
                full = {n: p.detach().clone().float() for n, p in trainable_named_parameters(model)}
            self.put(("traj", name, "llama", "fsdp1"), {"losses": recs, "params": full})
        wrapped = FSDP(common.build_model("llama"), use_orig_params=False, device_id=torch.device("cpu"))
        try:
            common.make_optimizer("MeZO", wrapped)
            msg = None
        except NotImplementedError as e:
            msg = str(e)
        self.put(("refuse", "fsdp1_flat"), msg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--checks", required=True)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--optimizers", default=",".join(common.OPTIMIZERS))
    args = ap.parse_args()
    out = Path(args.out)
    with exit_on_error():
        info = init_distributed(backend="gloo", timeout_s=float(os.environ.get("ZO_TEST_DIST_TIMEOUT", 90)))
        rank, world = info.rank, info.world_size
        if world > 1:
            common.import_deepspeed()  # after the group exists: DeepSpeed adopts it
        runner = Runner(rank, world, out, Path(args.ckpt) if args.ckpt else None, args.optimizers.split(","))
        checks = args.checks.split(",")
        checks.sort(key=lambda c: c != "fused")  # fused first: it sets TRITON_INTERPRET before triton loads
        for check in checks:
            t0 = time.perf_counter()
            getattr(runner, f"check_{check}")()
            runner.timings[check] = time.perf_counter() - t0
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            runner.results["_timings"] = runner.timings
            tmp = out / f".results_w{world}.pt.tmp"
            torch.save(runner.results, tmp)
            os.replace(tmp, out / f"results_w{world}.pt")
        del runner  # its models hold the group
        if world > 1:
            dist.barrier()
        destroy_distributed()


if __name__ == "__main__":
    main()
    # As launch/train.py: end without the interpreter's teardown. DeepSpeed keeps a ZeRO-3 engine's
    # parameters (hence its groups and gloo's threads) for the life of the process, and a gloo thread still
    # releasing a collective during teardown aborts the finished rank (issue #15). Results are on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
