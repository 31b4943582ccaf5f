"""Micro-benchmarks behind ``msrdarts bench`` (results are recorded in BENCHMARKS.md).

``bench_train_step`` times one training step of the evaluation network (forward with the
auxiliary head and drop path, backward, clip, SGD) for the reference network (DARTS's, in plain
PyTorch), the same in channels_last, and the fast path, in alternating rounds, against the same
ceilings. ``bench_search_step`` times one supernet training step (forward, backward, clip, SGD) for the
fused and the reference implementation and for the fused one without spectral norms, in
alternating rounds so that machine noise hits all alike, and puts the step against the machine's
own ceilings measured in the same run: the bandwidth of a large tensor copy and the throughput
of a large matmul. Each variant's timed steps in a round follow one untimed step of its own, as
in training: the first step after another variant's runs with that variant's data in the caches
and heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from .config import SearchConfig
from .device import Accel, resolve_device, sgd
from .errors import ConfigError, first_line
from .methods.msr import msr_genotype
from .nn.metrics import count_step_flops
from .nn.supernet import SuperNet
from .runs.memory import saved_bytes
from .runs.search import refresh_spectral_norms_due

VARIANTS = ("reference", "fused", "fused_no_sn", "fused_checkpoint_cells", "fused_recompute_depthwise")


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          params: list[torch.nn.Parameter] | None = None, forward: Any = None, accel: Accel | None = None) -> None:
    """One search step as :func:`msrdarts.runs.epoch.train_one_epoch` runs it (``params``: the
    model's parameters, listed once as the engine does; ``forward``: the model's forward, compiled
    or not; ``accel``: its autocast)."""
    with accel.autocast() if accel is not None else contextlib.nullcontext():
        loss = torch.nn.functional.cross_entropy((forward or model)(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params if params is not None else list(model.parameters()), 5.0)
    opt.step()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return sgd(model.parameters(), 0.025, 0.9, 3e-4)


def median_ms(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time in ms of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones
    (bench/batchnorm.py and bench/depthwise.py time with it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def time_search_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
                     opt: torch.optim.Optimizer | None = None, forward: Any = None,
                     accel: Accel | None = None) -> list[float]:
    """Wall time (s) of ``steps`` full training steps (forward, backward, clip, SGD) after ``warmup``."""
    opt = opt or _optimizer(model)
    model.train()
    params = list(model.parameters())
    times = []
    for i in range(warmup + steps):
        _sync(x.device)
        t0 = time.perf_counter()
        _step(model, opt, x, y, params, forward, accel)
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


class _TrafficCounter(TorchDispatchMode):
    """Bytes of every tensor read and written by the aten ops of a region: the memory traffic a
    step would cause with no cache reuse across ops (an upper bound on DRAM traffic)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def machine_ceilings(device: torch.device, copy_mb: int = 256, matmul_n: int = 2048, repeats: int = 5
                     ) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) of a ``copy_mb`` MB tensor and fp32 matmul GFLOP/s."""
    a = torch.empty(copy_mb * (1 << 20) // 4, device=device).uniform_()
    b = torch.empty_like(a)
    m1, m2 = torch.randn(matmul_n, matmul_n, device=device), torch.randn(matmul_n, matmul_n, device=device)
    copy_s, mm_s = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        copy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.mm(m1, m2)
        _sync(device)
        mm_s.append(time.perf_counter() - t0)
    return {"copy_gb_s": round(2 * a.numel() * 4 / min(copy_s) / 1e9, 2),
            "matmul_gflop_s": round(2 * matmul_n ** 3 / min(mm_s) / 1e9, 2)}


def _build(variant: str, layers: int, channels: int, input_size: int, in_channels: int, seed: int) -> SuperNet:
    torch.manual_seed(seed)
    return SuperNet(10, layers, channels, input_size, in_channels=in_channels,
                    impl="reference" if variant == "reference" else "fused",
                    spectral_norm=variant != "fused_no_sn", checkpoint_cells=variant == "fused_checkpoint_cells",
                    recompute_depthwise=variant == "fused_recompute_depthwise")


def refresh_rates_of(history: str) -> dict[str, float]:
    """Refreshes per weight step of each bundle of depthwise convs in a search's ``history.jsonl``
    (its records' ``sn_refreshes_by_map`` over their ``train_steps``), for :func:`bench_search_step`.
    ValueError (one line, naming the file) where it is missing or holds no such records."""
    try:
        records = [json.loads(line) for line in open(history) if line.strip()]
    except (OSError, ValueError) as e:
        raise ValueError(f"{history}: cannot read a search history ({first_line(e)})") from None
    if not records or not all(isinstance(r, dict) and "sn_refreshes_by_map" in r and "train_steps" in r
                              for r in records):
        raise ValueError(f"{history}: no spectral-norm refresh counts (sn_refreshes_by_map, train_steps) in its "
                         f"records; a search of this version with spectral norms writes them")
    steps = sum(r["train_steps"] for r in records)
    counts: dict[str, int] = {}
    for r in records:
        for name, n in r["sn_refreshes_by_map"].items():
            counts[name] = counts.get(name, 0) + n
    return {name: n / steps for name, n in counts.items()}


def bench_search_step(layers: int = 8, channels: int = 16, batch_size: int = 64, input_size: int = 32,
                      in_channels: int = 3, steps: int = 10, warmup: int = 2, device: str = "cpu",
                      threads: int | None = None, seed: int = 0, memory: bool = True, profile: bool = False,
                      amp: str = "auto", channels_last: str = "auto", compile: str = "auto",
                      refresh_interval: float = 10.0, refresh_rates: dict[str, float] | None = None
                      ) -> dict[str, Any]:
    """Median step times of the VARIANTS, ratios, traffic, FLOPs, ceilings and peak memory.

    ``amp``, ``channels_last`` and ``compile`` are the search's settings (:class:`msrdarts.device.Accel`;
    ``auto``: all on for an accelerator, all off on the CPU). Compiling happens in the warm-up steps.
    ``refresh_interval``: the mean number of weight steps between refreshes of all convs to
    amortise, an upper bound (default 10, the fixed schedule the search had before the drift
    trigger). The search refreshes each bundle of depthwise convs (one map size and stride) when its
    own weights have drifted (``sn_refresh_drift``), so how often is a property of a real search,
    not of this bench's random data: ``refresh_rates`` (refreshes per weight step by bundle name,
    :func:`refresh_rates_of` a real search's history) replaces the interval; each bundle's refresh
    is then timed alone and amortised at its rate.
    """
    if not refresh_interval > 0:
        raise ValueError(f"refresh_interval={refresh_interval}: must be > 0")
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    accel = Accel.resolve(dev, amp, channels_last, compile)
    torch.manual_seed(seed)
    x = accel.input(torch.randn(batch_size, in_channels, input_size, input_size, device=dev))
    y = torch.randint(0, 10, (batch_size,), device=dev)
    models = {v: accel.prepare_model(_build(v, layers, channels, input_size, in_channels, seed)) for v in VARIANTS}
    forwards = {v: accel.forward_fn(m, log=lambda message: print(message, file=sys.stderr)) for v, m in models.items()}
    opts = {v: _optimizer(m) for v, m in models.items()}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds = max(1, steps // 2)
    paired = []   # per round: fused over fused_no_sn, each its round's median (timed next to each other)
    for r in range(rounds):
        for v in VARIANTS:
            times[v] += time_search_step(models[v], x, y, steps=-(-steps // rounds), warmup=warmup if r == 0 else 1,
                                         opt=opts[v], forward=forwards[v], accel=accel)
        n = -(-steps // rounds)
        paired.append(statistics.median(times["fused"][-n:]) / statistics.median(times["fused_no_sn"][-n:]))
    ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    # The spectral-norm refreshes of the search loop (refresh_spectral_norms_due), amortised into the
    # overhead below: the 1x1 convs' every sn_refresh_every steps, the depthwise convs' either all
    # every refresh_interval steps on average or each bundle at its rate in refresh_rates, and the
    # drift check the search runs after every step. Each refresh is timed as the search runs it, on
    # the weights the warm-up and timed steps moved since the build converged the norms, three times
    # from that same state (the state is put back after each); the full refresh also at its full
    # length (every Krylov step, tol 0: the bound).
    cfg = SearchConfig()
    fused = models["fused"]
    names = fused.spectral_bundle_names()
    if refresh_rates is not None and set(refresh_rates) - set(names):
        raise ConfigError(f"refresh rates for {sorted(set(refresh_rates) - set(names))}: not bundles of this "
                         f"network's spectral norms ({', '.join(names)}); bench the search's own layers and sizes")
    moved = {k: v.clone() for k, v in fused.state_dict().items()}

    def timed_refresh(**kwargs: Any) -> float:
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            fused.refresh_spectral_norms(**kwargs)
            _sync(dev)
            t.append(time.perf_counter() - t0)
            fused.load_state_dict(moved)
        return 1000 * statistics.median(t)

    refresh_ms = {"pointwise": timed_refresh(bundles=[names.index("1x1")]), "all": timed_refresh(),
                  "all_full": timed_refresh(tol=0.0)}
    by_map = {name: timed_refresh(bundles=[names.index(name)]) for name in (refresh_rates or {})}
    t = []
    for _ in range(9):
        t0 = time.perf_counter()
        fused.spectral_drifted(cfg.sn_refresh_drift)
        t.append(time.perf_counter() - t0)
    drift_ms = 1000 * statistics.median(t) if cfg.sn_refresh_drift else 0.0
    shared = refresh_ms["pointwise"] / cfg.sn_refresh_every + drift_ms
    if refresh_rates is None:
        refresh_per_step = refresh_ms["all"] / refresh_interval + shared
        refresh_full_per_step = refresh_ms["all_full"] / refresh_interval + shared
    else:    # (no full-length figure per bundle: the bound is the all-convs one's, below)
        refresh_per_step = sum(rate * by_map[name] for name, rate in refresh_rates.items()) + shared
        refresh_full_per_step = refresh_per_step * refresh_ms["all_full"] / refresh_ms["all"]

    # Useful arithmetic: the reference's FLOPs (the fused path's dense small-map convs add some),
    # depthwise weight gradients counted correctly (torch's counter has them C times too high).
    flops = count_step_flops(lambda: _step(models["reference"], opts["reference"], x, y, None, None, accel))
    traffic = {}
    for v in ("reference", "fused"):
        with _TrafficCounter() as counter:
            _step(models[v], opts[v], x, y, None, None, accel)
        traffic[v] = counter.bytes
    ceilings = machine_ceilings(dev)

    t0 = time.perf_counter()   # the per-epoch table and derivation of a whole supernet
    msr_genotype(models["fused"])
    derive_ms = 1000 * (time.perf_counter() - t0)

    result: dict[str, Any] = {
        "layers": layers, "channels": channels, "batch_size": batch_size, "input_size": input_size,
        "in_channels": in_channels, "device": str(dev), "threads": torch.get_num_threads(),
        "amp": "bf16" if accel.amp else "off", "channels_last": accel.channels_last, "compile": accel.compile,
        "steps": len(times["fused"]), "torch": torch.__version__,
        "ms_per_step_reference": round(ms["reference"], 1), "ms_per_step_fused": round(ms["fused"], 1),
        "ms_per_step_fused_no_sn": round(ms["fused_no_sn"], 1),
        "ms_per_step_fused_checkpoint_cells": round(ms["fused_checkpoint_cells"], 1),
        "ms_per_step_fused_recompute_depthwise": round(ms["fused_recompute_depthwise"], 1),
        "speedup_fused_vs_reference": round(ms["reference"] / ms["fused"], 3),
        "sn_overhead_fused": round(ms["fused"] / ms["fused_no_sn"], 3),
        # the same from each round's pair of medians (the two builds timed next to each other), whose
        # median and quartiles over the rounds shrug off the machine's drift during the run
        "sn_overhead_fused_paired": round(quartiles[1], 3),
        "sn_overhead_fused_paired_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "sn_refresh_ms": round(refresh_ms["all"], 1), "sn_refresh_full_length_ms": round(refresh_ms["all_full"], 1),
        "sn_refresh_pointwise_ms": round(refresh_ms["pointwise"], 1),
        "sn_refresh_every": cfg.sn_refresh_every,
        **({"sn_refresh_interval": refresh_interval} if refresh_rates is None else
           {"sn_refresh_rates": {k: round(v, 4) for k, v in refresh_rates.items()},
            "sn_refresh_ms_by_map": {k: round(v, 1) for k, v in by_map.items()}}),
        "sn_drift_check_ms": round(drift_ms, 2),
        "sn_refresh_ms_per_step": round(refresh_per_step, 2),
        "sn_overhead_fused_with_refresh": round((ms["fused"] + refresh_per_step) / ms["fused_no_sn"], 3),
        "sn_overhead_fused_paired_with_refresh": round(quartiles[1] + refresh_per_step / ms["fused_no_sn"], 3),
        "sn_overhead_fused_with_full_length_refresh": round((ms["fused"] + refresh_full_per_step) / ms["fused_no_sn"], 3),
        "images_per_s_fused": round(batch_size / (ms["fused"] / 1000), 1),
        "gflop_per_step": round(flops / 1e9, 2),
        "gflop_s_reference": round(flops / ms["reference"] / 1e6, 2),
        "gflop_s_fused": round(flops / ms["fused"] / 1e6, 2),
        "traffic_gb_reference": round(traffic["reference"] / 1e9, 2),
        "traffic_gb_fused": round(traffic["fused"] / 1e9, 2),
        "gb_s_reference": round(traffic["reference"] / ms["reference"] / 1e6, 2),
        "gb_s_fused": round(traffic["fused"] / ms["fused"] / 1e6, 2),
        **ceilings,
        "stable_rank_table_and_derivation_ms": round(derive_ms, 1),
    }
    for v in ("fused", "fused_recompute_depthwise"):
        result[f"saved_for_backward_mb_{v}"] = saved_for_backward_mb(models[v], x, accel)
    if memory:
        for v in ("reference", "fused", "fused_checkpoint_cells", "fused_recompute_depthwise"):
            result[f"peak_step_memory_mb_{v}"] = peak_step_memory_mb(v, layers, channels, batch_size, input_size,
                                                                     in_channels, device, seed, accel)
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            _step(models["fused"], opts["fused"], x, y, None, forwards["fused"], accel)
        result["profile_fused"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                            max_name_column_width=40)
    return result


def saved_for_backward_mb(model: torch.nn.Module, x: torch.Tensor, accel: Accel | None = None) -> float:
    """MB of the distinct tensors autograd keeps from one eager training forward of ``model`` for
    its backward (each storage once; under ``accel``'s autocast), read by a saved-tensors hook
    (:func:`msrdarts.runs.memory.saved_tensor_storages`, which compiled graphs do not support): the activation memory a
    step must hold, whatever the allocator keeps besides (on the CPU glibc holds freed blocks it
    cannot return, so the resident peak is higher; on a GPU the caching allocator's peak is close
    to this plus the largest transients)."""
    return round(saved_bytes(model, x, accel.autocast() if accel is not None else None) / 2 ** 20, 1)


def peak_step_memory_mb(variant: str, layers: int, channels: int, batch_size: int, input_size: int,
                        in_channels: int, device: str, seed: int, accel: Accel | None = None) -> float | None:
    """Peak memory (MB) one training step adds over the built model, in a fresh process.

    On the CPU: the process's resident high-water mark (reset after building, Linux only) minus
    the resident size before the step; on an accelerator: its peak allocated memory.
    """
    settings = ["bf16" if accel.amp else "off", _switch(accel.channels_last), _switch(accel.compile)] \
        if accel is not None else ["off", "off", "off"]
    args = json.dumps([variant, layers, channels, batch_size, input_size, in_channels, device, seed, *settings])
    code = f"import json, msrdarts.bench as b; print(json.dumps(b._peak_child(*json.loads({args!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _switch(on: bool) -> str:
    return "on" if on else "off"


def _peak_child(variant: str, layers: int, channels: int, batch_size: int, input_size: int, in_channels: int,
                device: str, seed: int, amp: str = "off", channels_last: str = "off",
                compile: str = "off") -> float | None:
    dev = resolve_device(device)
    accel = Accel.resolve(dev, amp, channels_last, compile)
    model = accel.prepare_model(_build(variant, layers, channels, input_size, in_channels, seed))
    forward = accel.forward_fn(model, log=lambda message: None)
    opt = _optimizer(model)
    x = accel.input(torch.randn(batch_size, in_channels, input_size, input_size, device=dev))
    y = torch.randint(0, 10, (batch_size,), device=dev)
    if dev.type != "cpu" and accel.compile:
        _step(model, opt, x, y, None, forward, accel)   # compile outside the measured step
    return _peak_mb(lambda: _step(model, opt, x, y, None, forward, accel), dev)


def _peak_mb(step: Any, dev: torch.device) -> float | None:
    """Peak memory (MB) ``step()`` adds: on an accelerator its peak allocated memory; on the CPU
    the resident high-water mark (reset first, Linux only) over the resident size before it, after
    glibc's ``malloc_trim`` has handed back the memory freed so far (else the step reuses it unseen,
    and the figure reads low: BENCHMARKS.md, "What fits in 80 GB")."""
    if dev.type != "cpu":
        mod = getattr(torch, dev.type)
        mod.reset_peak_memory_stats(dev)
        before = mod.memory_allocated(dev)
        step()
        return round((mod.max_memory_allocated(dev) - before) / 2 ** 20, 1)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset the high-water mark
        before = _rss_kb("VmRSS")
        step()
        return round((_rss_kb("VmHWM") - before) / 1024, 1)
    except OSError:
        return None


def _method_setup(method: str, space: str, layers: int, channels: int, batch_size: int, input_size: int,
                  in_channels: int, device: str, seed: int) -> tuple[Any, ...]:
    """A supernet adapted by ``method`` at one configuration, its weight optimiser, the method's
    step hook (architecture steps on random search-valid batches), a batch and the config."""
    from .methods import SearchContext, get_method

    cls = get_method(method)
    extra: dict[str, Any] = dict(cls.defaults)
    if method == "p-darts":   # the first stage's step: every op on every edge
        extra.update(stage_layers=(layers,), stage_keep=(1,), skip_dropout=(0.1,))
    cfg = SearchConfig(method=method, space=space, layers=layers, channels=channels, batch_size=batch_size,
                       device=device, compile="off", **extra).validate()
    cls.validate(cfg)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    net = SuperNet(10, layers, channels, input_size, in_channels=in_channels, primitives=cfg.ops,
                   spectral_norm=cfg.spectral_norm, impl=cfg.impl, **cls.supernet_options(cfg)).to(dev)
    m = cls(cfg)
    m.adapt(net)
    opt = sgd(net.weight_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    g = torch.Generator(device=dev).manual_seed(seed + 1)

    def valid_batches(_seed: int, _start: int):
        while True:
            yield (torch.randn(batch_size, in_channels, input_size, input_size, device=dev, generator=g),
                   torch.randint(0, 10, (batch_size,), device=dev, generator=g))

    m.setup(net, opt, SearchContext(accel=Accel.resolve(dev, "off", "off", "off"), average=None,
                                    valid_batches=valid_batches))
    m.new_epoch(0, True)
    hook = m.step_hook(0, 0)
    x = torch.randn(batch_size, in_channels, input_size, input_size, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    return net, opt, hook, x, y, cfg


def _method_step(net: Any, opt: Any, hook: Any, x: torch.Tensor, y: torch.Tensor, cfg: Any, i: int) -> None:
    """One search step as the loop runs it: the method's step first, then the weights', then the
    spectral-norm refreshes on the search's schedule (their cost amortised in the timing)."""
    if hook is not None:
        hook(i, x, y)
    _step(net, opt, x, y, net.weight_parameters())
    refresh_spectral_norms_due(net, cfg, i)


def bench_methods(methods: list[str], space: str = "msr", layers: int = 8, channels: int = 16, batch_size: int = 64,
                  input_size: int = 32, in_channels: int = 3, steps: int = 10, warmup: int = 2, device: str = "cpu",
                  threads: int | None = None, seed: int = 0, memory: bool = True) -> dict[str, Any]:
    """Median ms per search step of each method at one configuration, timed side by side in
    rounds (ms, images/s, and peak memory of one step in a fresh process)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    setups = {m: _method_setup(m, space, layers, channels, batch_size, input_size, in_channels, device, seed)
              for m in methods}
    counters = {m: 0 for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    rounds = max(1, steps // 2)
    for r in range(rounds):
        for m in methods:
            net, opt, hook, x, y, cfg = setups[m]
            net.train()
            for k in range((warmup if r == 0 else 0) + -(-steps // rounds)):
                _sync(dev)
                t0 = time.perf_counter()
                _method_step(net, opt, hook, x, y, cfg, counters[m])
                _sync(dev)
                counters[m] += 1
                if r > 0 or k >= warmup:
                    times[m].append(time.perf_counter() - t0)
    result: dict[str, Any] = {"space": space, "layers": layers, "channels": channels, "batch_size": batch_size,
                              "input_size": input_size, "device": str(dev), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "steps": len(times[methods[0]]), "methods": {}}
    for m in methods:
        ms = 1000 * statistics.median(times[m])
        row = {"ms_per_step": round(ms, 1), "images_per_s": round(batch_size / ms * 1000, 1),
               "sn_refresh_every": setups[m][5].sn_refresh_every if setups[m][5].spectral_norm else None,
               "sn_refresh_depthwise_every": setups[m][5].sn_refresh_depthwise_every if setups[m][5].spectral_norm else None,
               "sn_refresh_drift": setups[m][5].sn_refresh_drift if setups[m][5].spectral_norm else None}
        if memory:
            args = json.dumps([m, space, layers, channels, batch_size, input_size, in_channels, device, seed])
            code = f"import json, msrdarts.bench as b; print(json.dumps(b._method_peak_child(*json.loads({args!r}))))"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
            row["peak_step_memory_mb"] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
                else None
        result["methods"][m] = row
    return result


def _method_peak_child(method: str, space: str, layers: int, channels: int, batch_size: int, input_size: int,
                       in_channels: int, device: str, seed: int) -> float | None:
    net, opt, hook, x, y, cfg = _method_setup(method, space, layers, channels, batch_size, input_size, in_channels,
                                              device, seed)
    # the first step: later ones reuse memory the allocator kept, invisible to the RSS mark
    return _peak_mb(lambda: _method_step(net, opt, hook, x, y, cfg, 0), x.device)


TRAIN_VARIANTS = ("reference", "reference_channels_last", "fast")


def _train_setup(variant: str, genotype: str, layers: int, channels: int, batch_size: int, input_size: int,
                 num_classes: int, device: str, seed: int, amp: str, channels_last: str, compile: str,
                 drop_path: float = 0.2) -> tuple[Any, ...]:
    """One variant's evaluation network (auxiliary head, drop path), optimiser, forward and batch.

    ``reference``: DARTS's network in plain PyTorch ops, in the memory format the run's settings
    give it (NCHW on the CPU by default); ``reference_channels_last``: the same in channels_last
    (to show what the memory format alone gives); ``fast``: ``--impl fast`` as training runs it.
    """
    from .nn.network import Network
    from .nn.ops import list_ops
    from .zoo import load_genotype

    dev = resolve_device(device)
    fast = variant == "fast"
    accel = Accel.resolve(dev, amp, "on" if variant == "reference_channels_last" else channels_last, compile,
                          cpu_channels_last=fast)
    torch.manual_seed(seed)
    net = Network(load_genotype(genotype, primitives=list_ops()), num_classes, layers, channels,
                  input_size=input_size, auxiliary=True, impl="fast" if fast else "reference")
    net.set_drop_path(drop_path)
    net = accel.prepare_model(net).train()
    opt = sgd(net.parameters(), 0.025, 0.9, 3e-4)
    g = torch.Generator(device=dev).manual_seed(seed)
    x = accel.input(torch.randn(batch_size, 3, input_size, input_size, device=dev, generator=g))
    y = torch.randint(0, num_classes, (batch_size,), device=dev, generator=g)
    return net, opt, accel.forward_fn(net, log=lambda message: print(message, file=sys.stderr)), accel, x, y


def _train_step(net: Any, opt: Any, forward: Any, accel: Accel, x: torch.Tensor, y: torch.Tensor,
                params: list | None = None) -> None:
    """One training step as :class:`msrdarts.runs.train.TrainRun` runs it (loss + 0.4 x auxiliary loss)."""
    from .runs.train import auxiliary_criterion

    with accel.autocast():
        loss, _ = auxiliary_criterion(0.4)(forward(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params if params is not None else list(net.parameters()), 5.0)
    opt.step()


def bench_train_step(genotype: str = "DARTS_V2", layers: int = 20, channels: int = 36, batch_size: int = 96,
                     input_size: int = 32, num_classes: int = 10, steps: int = 6, warmup: int = 2,
                     device: str = "cpu", threads: int | None = None, seed: int = 0, memory: bool = True,
                     amp: str = "auto", channels_last: str = "auto", compile: str = "auto",
                     variants: tuple[str, ...] = TRAIN_VARIANTS) -> dict[str, Any]:
    """Median step times of the evaluation network's TRAIN_VARIANTS, timed in alternating rounds,
    with speedups, FLOPs (grouped convs counted correctly), traffic, the machine's ceilings and
    the peak memory of one step of the reference and the fast path (each in a fresh process)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    setups = {v: _train_setup(v, genotype, layers, channels, batch_size, input_size, num_classes, device, seed,
                              amp, channels_last, compile) for v in variants}
    params = {v: list(s[0].parameters()) for v, s in setups.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    rounds = max(1, steps // 2)
    for r in range(rounds):
        for v in variants:
            for k in range((warmup if r == 0 else 1) + -(-steps // rounds)):
                _sync(dev)
                t0 = time.perf_counter()
                _train_step(*setups[v], params[v])
                _sync(dev)
                if k >= (warmup if r == 0 else 1):
                    times[v].append(time.perf_counter() - t0)
    ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    ref = setups[variants[0]]
    accel = ref[3]
    flops = count_step_flops(lambda: _train_step(ref[0], ref[1], ref[0], accel, ref[4], ref[5]))
    traffic = {}
    for v in variants:
        net, opt, _, acc, x, y = setups[v]
        with _TrafficCounter() as counter:
            _train_step(net, opt, net, acc, x, y)
        traffic[v] = counter.bytes
    from .nn.metrics import count_parameters

    result: dict[str, Any] = {
        "genotype": genotype, "layers": layers, "channels": channels, "batch_size": batch_size,
        "input_size": input_size, "device": str(dev), "threads": torch.get_num_threads(),
        "amp": "bf16" if accel.amp else "off", "compile": accel.compile, "torch": torch.__version__,
        "params_m": round(count_parameters(ref[0]) / 1e6, 3), "steps": len(times[variants[0]]),
        "gflop_per_step": round(flops / 1e9, 2), **machine_ceilings(dev)}
    for v in variants:
        result[f"channels_last_{v}"] = setups[v][4].is_contiguous(memory_format=torch.channels_last) \
            and not setups[v][4].is_contiguous()
        result[f"ms_per_step_{v}"] = round(ms[v], 1)
        result[f"images_per_s_{v}"] = round(batch_size / ms[v] * 1000, 1)
        result[f"gflop_s_{v}"] = round(flops / ms[v] / 1e6, 2)
        result[f"traffic_gb_{v}"] = round(traffic[v] / 1e9, 2)
        result[f"gb_s_{v}"] = round(traffic[v] / ms[v] / 1e6, 2)
    for v in variants[1:]:
        result[f"speedup_{v}_vs_{variants[0]}"] = round(ms[variants[0]] / ms[v], 3)
    if memory:
        for v in (variants[0], variants[-1]):
            args = json.dumps([v, genotype, layers, channels, batch_size, input_size, num_classes, device, seed,
                               amp, channels_last, compile])
            code = f"import json, msrdarts.bench as b; print(json.dumps(b._train_peak_child(*json.loads({args!r}))))"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
            result[f"peak_step_memory_mb_{v}"] = json.loads(out.stdout.strip().splitlines()[-1]) \
                if out.returncode == 0 else None
    return result


def _train_peak_child(*args: Any) -> float | None:
    net, opt, forward, accel, x, y = _train_setup(*args)
    if x.device.type != "cpu" and accel.compile:
        _train_step(net, opt, forward, accel, x, y)   # compile outside the measured step
    return _peak_mb(lambda: _train_step(net, opt, forward, accel, x, y), x.device)

