"""Honest timing of the training step: compiled, warmed up, synchronized, side by side.

Every figure comes from this process in this run: the step time of the real
compiled train step (median over calls after warm-up), the step time of the
same model, batch and optimizer in eager PyTorch (when torch is installed),
timed in alternating rounds with the JAX step so that load from other
processes hits both alike, and the matmul FLOP/s of this machine measured in
the same run, so the MFU is not a guess. The hardware peak is an estimate
from /proc/cpuinfo whose assumption is printed with it.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops_per_s(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of one jit-compiled (n, n) @ (n, n) matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    return 2 * n**3 / _median_seconds(lambda: mm(a, b), repeats)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if platform.system() == "Darwin" else rss / 1024


def cpu_cores() -> int:
    """Cores this process may run on (XLA:CPU sizes its thread pool the same way)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key and key not in info:  # first processor's entry
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def cpu_peak_flops(cores: int | None = None, cpuinfo: dict | None = None) -> tuple[float, str] | None:
    """Estimated float32 peak of the CPU: cores x FLOP/cycle/core x clock, with the assumption made.

    FLOP/cycle/core = 2 (an FMA) x float32 lanes x FMA pipes: 32 for AVX2 with
    FMA (2 pipes x 8 lanes) and for AMD Zen 4 AVX-512 (its 512-bit FMAs run on
    two 256-bit pipes); 64 for Intel AVX-512 (assumes 2 FMA units, true of
    server parts). The clock is the one /proc/cpuinfo reports, the nominal
    one: turbo is not counted, so a boosting chip can exceed this "peak".
    None where it cannot be told (not x86 Linux, no clock, no FMA).
    """
    info = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set(info.get("flags", "").split())
    try:
        ghz = float(info["cpu MHz"]) / 1000
    except (KeyError, ValueError):
        return None
    cores = cpu_cores() if cores is None else cores
    vendor = info.get("vendor_id", "")
    if "avx512f" in flags and vendor == "AuthenticAMD":
        per_cycle, how = 32, "AVX-512 on AMD (Zen 4: 2 x 256-bit FMA pipes) = 32"
    elif "avx512f" in flags:
        per_cycle, how = 64, "AVX-512 x 2 FMA units = 64"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, how = 32, "AVX2 x 2 FMA units = 32"
    else:
        return None
    note = f"{cores} cores x {how} FLOP/cycle x {ghz:.2f} GHz (nominal clock from /proc/cpuinfo; turbo not counted)"
    return cores * per_cycle * ghz * 1e9, note


def cpu_model_name() -> str:
    return _cpuinfo().get("model name", platform.processor() or "unknown")


def _torch_trainer(trainer, threads: int):
    """The eager PyTorch reference of ``trainer``'s model, or a reason why there is none."""
    try:
        import torch

        from attention_jax import torch_reference
    except ImportError:
        return None, "torch is not installed (pip install torch): PyTorch comparison skipped"
    if trainer.config.model.type != "transformer":
        return None, f"no PyTorch reference for model.type={trainer.config.model.type!r}: comparison skipped"
    if trainer.num_seeds != 1:  # the reference trains one seed; a K-seed step is not comparable
        return None, f"num_seeds={trainer.num_seeds}: the PyTorch reference trains one seed, comparison skipped"
    torch.set_num_threads(threads)
    try:
        ref = torch_reference.TorchTrainer(trainer.config, trainer.mcfg, jax.device_get(trainer.train_data))
    except ValueError as e:
        return None, f"{e}: PyTorch comparison skipped"
    return ref, None


def benchmark_training(
    config: ml_collections.ConfigDict,
    steps: int = 30,
    warmup: int = 3,
    matmul_n: int = 2048,
    *,
    torch_compare: bool = True,
    torch_threads: int | None = None,
    peak_flops: float | None = None,
):
    """Time ``steps`` optimizer steps of the real train step of ``config``.

    With ``torch_compare`` (on the CPU backend, torch installed), the eager
    PyTorch reference runs the same number of steps in alternating rounds:
    one compiled JAX call (``steps_per_call`` steps), then as many PyTorch
    steps, with ``torch_threads`` threads (default: the cores XLA uses).
    ``peak_flops`` overrides the hardware-peak estimate of :func:`cpu_peak_flops`.
    """
    from attention_jax.train import Trainer

    trainer = Trainer.from_config(config)
    state = trainer.init_state()
    per_call = config.steps_per_call
    t0 = time.perf_counter()
    step = trainer.compile_train(per_call).lower(state).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, out = step(state)
        jax.block_until_ready(out)

    on_cpu = jax.default_backend() == "cpu"
    threads = torch_threads or cpu_cores()
    ref, torch_note = None, None
    if not torch_compare:
        torch_note = "PyTorch comparison off (--no-torch)"
    elif not on_cpu:
        torch_note = f"PyTorch comparison is CPU only (backend {jax.default_backend()})"
    else:
        ref, torch_note = _torch_trainer(trainer, threads)
        if ref is not None:
            for _ in range(max(warmup, 2)):
                ref.step()

    calls = max(1, -(-steps // per_call))
    jax_times, torch_times = [], []  # seconds per optimizer step
    for i in range(calls):

        def run_jax():
            nonlocal state
            t = time.perf_counter()
            state, out = step(state)
            jax.block_until_ready(out)
            jax_times.append((time.perf_counter() - t) / per_call)

        def run_torch():
            for _ in range(per_call):
                t = time.perf_counter()
                ref.step()
                torch_times.append(time.perf_counter() - t)

        order = (run_jax, run_torch) if i % 2 == 0 else (run_torch, run_jax)  # neither always goes first
        for run in order:
            if run is run_jax or ref is not None:
                run()

    s_per_step = statistics.median(jax_times)
    flops_step = trainer.flops_per_step()
    mm = matmul_flops_per_s(matmul_n)
    model_flops = flops_step / s_per_step
    result = {
        "config": f"{config.model.n_layer}L {config.model.n_head}H C{config.model.n_embd} "
        f"T{config.model.block_size} B{config.batch_size}",
        "ms_per_step": round(1000 * s_per_step, 3),
        "ms_per_step_min": round(1000 * min(jax_times), 3),
        "tokens_per_s": round(trainer.tokens_per_step / s_per_step, 1),
        "gflop_per_step": round(flops_step / 1e9, 3),
        "model_flops_per_s": round(model_flops, 1),
        "matmul_flops_per_s": round(mm, 1),
        "mfu": round(model_flops / mm, 4),
        "compile_s": round(compile_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "steps_per_call": per_call,
        "measured_steps": calls * per_call,
        "jax": jax.__version__,
    }
    peak = (peak_flops, "given by --peak_gflops") if peak_flops else (cpu_peak_flops() if on_cpu else None)
    if peak is not None:
        result["hardware_peak_flops_per_s"] = round(peak[0], 1)
        result["hardware_peak_note"] = peak[1]
        result["mfu_hardware"] = round(model_flops / peak[0], 4)
    if on_cpu:
        result["cpu"] = cpu_model_name()
        result["cpu_cores"] = cpu_cores()
    if ref is None:
        result.update(torch_ms_per_step=None, jax_over_torch=None, torch_skipped=torch_note)
        return result
    import torch

    t_per_step = statistics.median(torch_times)
    torch_tokens = config.batch_size * trainer.mcfg.block_size  # one seed
    result.update(
        torch_ms_per_step=round(1000 * t_per_step, 3),
        torch_ms_per_step_min=round(1000 * min(torch_times), 3),
        torch_tokens_per_s=round(torch_tokens / t_per_step, 1),
        jax_over_torch=round(s_per_step / t_per_step, 3),
        jax_over_torch_per_token=round((s_per_step / trainer.tokens_per_step) / (t_per_step / torch_tokens), 3),
        jax_over_torch_min=round(min(jax_times) / min(torch_times), 3),
        torch_threads=threads,
        torch=torch.__version__,
    )
    return result


def format_table(result: dict) -> str:
    rows = [
        ("model", result["config"]),
        ("backend", f"{result['backend']} ({result['device_kind']}) x{result['devices']}"),
    ]
    if "cpu" in result:
        rows.append(("cpu", f"{result['cpu']}, {result['cpu_cores']} cores"))
    rows += [
        (
            "step time",
            f"{result['ms_per_step']:.2f} ms (median of {result['measured_steps']} steps, "
            f"{result['steps_per_call']} per call; min {result['ms_per_step_min']:.2f})",
        ),
        ("throughput", f"{result['tokens_per_s']:,.0f} tokens/s"),
    ]
    if result.get("torch_ms_per_step") is not None:
        rows += [
            (
                "PyTorch step",
                f"{result['torch_ms_per_step']:.2f} ms (eager torch {result['torch']}, "
                f"{result['torch_threads']} threads, same rounds; min {result['torch_ms_per_step_min']:.2f})",
            ),
            ("PyTorch tokens/s", f"{result['torch_tokens_per_s']:,.0f} tokens/s"),
            (
                "JAX / PyTorch",
                f"{result['jax_over_torch']:.2f} per step, {result['jax_over_torch_per_token']:.2f} per token "
                f"(< 1: JAX faster; of the min times {result['jax_over_torch_min']:.2f})",
            ),
        ]
    else:
        rows.append(("PyTorch", result.get("torch_skipped", "skipped")))
    rows += [
        ("model FLOP/step", f"{result['gflop_per_step']:.2f} GFLOP"),
        ("model FLOP/s", f"{result['model_flops_per_s'] / 1e9:.1f} GFLOP/s"),
        ("matmul FLOP/s", f"{result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (measured now)"),
        ("MFU", f"{100 * result['mfu']:.1f}% of measured matmul speed"),
    ]
    if "mfu_hardware" in result:
        peak = result["hardware_peak_flops_per_s"] / 1e9
        rows.append(("MFU (hardware)", f"{100 * result['mfu_hardware']:.1f}% of {peak:.0f} GFLOP/s peak"))
        rows.append(("  peak assumes", result["hardware_peak_note"]))
        if result["matmul_flops_per_s"] > result["hardware_peak_flops_per_s"]:
            rows.append(("  note", "the measured matmul beats this peak: the cores run above the nominal clock"))
    rows += [
        ("compile", f"{result['compile_s']:.1f} s"),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
