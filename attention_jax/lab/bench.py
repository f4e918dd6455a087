"""Honest timing of the training step: compiled, warmed up, synchronized, side by side.

Every figure comes from this process in this run: the step time of the real
compiled train step (median over calls after warm-up) and the matmul FLOP/s
of this machine measured in the same run, so the MFU is not a guess. The
hardware peak is an estimate whose assumption is printed with it.

A ``reference`` (another implementation of the same step, such as the eager
PyTorch twin in ``benchmarks/torch_reference.py``) is timed in alternating
rounds with the JAX step, so that load from other processes hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Protocol

import jax
import ml_collections

from attention_jax.lab import experiment as ex
from attention_jax.lab.hardware import cpu_cores, cpu_model_name, cpu_peak_flops, matmul_flops_per_s, peak_rss_mb
from attention_jax.lab.parts import Parts, resolve


class Reference(Protocol):
    """Another implementation of one optimizer step of the same model, batch and optimizer."""

    label: str  # "PyTorch"
    info: str  # shown in the table: version, threads, ...
    tokens_per_step: int

    def step(self) -> object: ...


class NoReference(Exception):
    """Raised by a reference factory that cannot build its reference here; the message says why."""


def time_side_by_side(step, state, reference: Reference | None, calls: int, per_call: int, warmup: int):
    """Seconds per optimizer step of ``calls`` calls of the compiled ``step`` and of as many reference steps.

    The two sides alternate call by call, neither always first, so that load
    from other processes hits both alike. Both are warmed up first.
    """
    for _ in range(warmup):
        state, out = step(state)
        jax.block_until_ready(out)
    if reference is not None:
        for _ in range(max(warmup, 2)):
            reference.step()
    jax_times, ref_times = [], []

    def run_jax():
        nonlocal state
        t = time.perf_counter()
        state, out = step(state)
        jax.block_until_ready(out)
        jax_times.append((time.perf_counter() - t) / per_call)

    def run_reference():
        for _ in range(per_call):
            t = time.perf_counter()
            reference.step()
            ref_times.append(time.perf_counter() - t)

    sides = [run_jax] if reference is None else [run_jax, run_reference]
    for i in range(calls):
        for run in sides if i % 2 == 0 else sides[::-1]:
            run()
    return jax_times, ref_times


def benchmark_training(
    config: ml_collections.ConfigDict | Parts,
    steps: int = 30,
    warmup: int = 3,
    matmul_n: int = 2048,
    *,
    reference: Callable[[ex.Experiment], Reference] | None = None,
    peak_flops: float | None = None,
) -> dict:
    """Time ``steps`` optimizer steps of the real train step of ``config``, and of its ``reference``.

    ``reference(experiment)`` builds the other implementation, or raises
    ``NoReference`` saying why it cannot (printed in its place). ``peak_flops``
    overrides the hardware-peak estimate of ``cpu_peak_flops``. ``config`` is
    resolved here, once (or given as its resolved parts).
    """
    parts = config if isinstance(config, Parts) else resolve(config, device_count=jax.device_count())
    exp = ex.Experiment.from_parts(parts)
    reference_note = None
    if reference is not None:
        try:
            reference = reference(exp)
        except NoReference as e:
            reference, reference_note = None, str(e)
    per_call = parts.run.steps_per_call
    state = ex.init_state(exp)
    t0 = time.perf_counter()
    step = ex.train_steps(exp, per_call, state)
    compile_s = time.perf_counter() - t0
    calls = max(1, -(-steps // per_call))
    jax_times, ref_times = time_side_by_side(step, state, reference, calls, per_call, warmup)
    s_per_step = statistics.median(jax_times)
    flops_step = exp.flops_per_step()
    mm = matmul_flops_per_s(matmul_n)
    model_flops = flops_step / s_per_step
    mc = exp.model_config
    result = {
        "config": f"{mc.n_layer}L {mc.n_head}H C{mc.n_embd} T{mc.block_size} B{parts.data.batch_size}",
        "ms_per_step": round(1000 * s_per_step, 3),
        "ms_per_step_min": round(1000 * min(jax_times), 3),
        "tokens_per_s": round(exp.tokens_per_step / s_per_step, 1),
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
    on_cpu = jax.default_backend() == "cpu"
    peak = (peak_flops, "given by --peak_gflops") if peak_flops else (cpu_peak_flops() if on_cpu else None)
    if peak is not None:
        result["hardware_peak_flops_per_s"] = round(peak[0], 1)
        result["hardware_peak_note"] = peak[1]
        result["mfu_hardware"] = round(model_flops / peak[0], 4)
    if on_cpu:
        result["cpu"] = cpu_model_name()
        result["cpu_cores"] = cpu_cores()
    if reference is None:
        result.update(reference_ms_per_step=None, jax_over_reference=None, reference_skipped=reference_note)
        return result
    r_per_step = statistics.median(ref_times)
    result.update(
        reference=reference.label,
        reference_info=reference.info,
        reference_ms_per_step=round(1000 * r_per_step, 3),
        reference_ms_per_step_min=round(1000 * min(ref_times), 3),
        reference_tokens_per_s=round(reference.tokens_per_step / r_per_step, 1),
        jax_over_reference=round(s_per_step / r_per_step, 3),
        jax_over_reference_per_token=round(
            (s_per_step / exp.tokens_per_step) / (r_per_step / reference.tokens_per_step), 3
        ),
        jax_over_reference_min=round(min(jax_times) / min(ref_times), 3),
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
    if result.get("reference_ms_per_step") is not None:
        name = result["reference"]
        rows += [
            (
                f"{name} step",
                f"{result['reference_ms_per_step']:.2f} ms ({result['reference_info']}, same rounds; "
                f"min {result['reference_ms_per_step_min']:.2f})",
            ),
            (f"{name} tokens/s", f"{result['reference_tokens_per_s']:,.0f} tokens/s"),
            (
                f"JAX / {name}",
                f"{result['jax_over_reference']:.2f} per step, {result['jax_over_reference_per_token']:.2f} per "
                f"token (< 1: JAX faster; of the min times {result['jax_over_reference_min']:.2f})",
            ),
        ]
    elif result.get("reference_skipped"):
        rows.append(("reference", result["reference_skipped"]))
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
