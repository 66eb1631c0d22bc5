"""Which attention kernel runs: named with `--attn`, or measured once per device and shape.

Kernels (`model/kernels.py` and `model/attention.py` say what each computes):

    prefill  lower-right  one call with a bottom-right causal bias (what longva did before)
             cudnn, flash, efficient, flex, cpu-flash, math
                          the chunk split at the cached past, merged by log-sum-exp, on that backend
    decode   sdpa         transformers' SDPA call, PyTorch's own backend choice (what longva did before)
             cudnn, flash, efficient, flex, cpu-flash, math
                          that backend, grouped heads folded into rows (no repeated keys)
             gemm         two batched cuBLAS products and a float32 softmax (`gemm_decode`)

`--attn` names them: `auto`; `sdpa` (lower-right / sdpa: longva before measured kernels);
a backend for both phases (`cudnn`, `flash`, `efficient`, `flex`, `cpu-flash`, `math`); or
`PREFILL/DECODE` (`cudnn/gemm`). `eager` and `flash_attention_2` stay transformers' own
implementations.

`auto` on CUDA measures: the first time a shape class (phase, dtype, heads, head dim, and the
query and key counts rounded up to powers of two) meets the model, the candidates run on that
call's own tensors; one whose output differs from the reference (what longva did before) or
that fails is set aside with the reason, the fastest of the rest is kept, and the record goes
to `~/.cache/longva/kernels.json` under the device's name and the torch and cuDNN versions, so
later runs do not measure again. FlexAttention is not measured by `auto`: its first call
compiles for tens of seconds; name it to use it. On the CPU `auto` is what longva did before,
unmeasured.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from longva_cli.errors import LongVAError
from longva_cli.model.kernels import BACKENDS

AUTO = "auto"
PREFILL_KERNELS = ("lower-right", "cudnn", "flash", "efficient", "flex", "cpu-flash", "math")
DECODE_KERNELS = ("sdpa", "cudnn", "flash", "efficient", "flex", "cpu-flash", "math", "gemm")
# What `auto` measures on CUDA, the reference first (the others must match it).
MEASURED = {
    "prefill": ("lower-right", "cudnn", "flash", "efficient"),
    "decode": ("sdpa", "flash", "cudnn", "efficient", "gemm"),
}
BEFORE = {"prefill": "lower-right", "decode": "sdpa"}  # also `auto`'s choice on the CPU
KINDS = "auto, sdpa, eager, flash_attention_2, cudnn, flash, efficient, flex, cpu-flash, math, or PREFILL/DECODE kernels"


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a model's attention runs: a name per phase, or `auto`."""

    prefill: str = AUTO
    decode: str = AUTO

    @classmethod
    def parse(cls, attn: str) -> "KernelChoice":
        """`--attn`'s kernels: `auto`, `sdpa`, a backend for both phases, or `PREFILL/DECODE`."""
        if attn == AUTO:
            return cls()
        if attn == "sdpa":
            return cls(BEFORE["prefill"], BEFORE["decode"])
        prefill, _, decode = attn.partition("/")
        decode = decode or prefill
        if prefill not in PREFILL_KERNELS + (AUTO,) or decode not in DECODE_KERNELS + (AUTO,):
            raise LongVAError(
                f"--attn {attn!r} is not known; use {KINDS} "
                f"(prefill: {', '.join(PREFILL_KERNELS)}; decode: {', '.join(DECODE_KERNELS)}), e.g. cudnn/gemm."
            )
        return cls(prefill, decode)

    def check(self, device: torch.device) -> None:
        """Fail in one sentence when a named kernel cannot run on `device`."""
        for phase, name in (("prefill", self.prefill), ("decode", self.decode)):
            runs_on = _devices(name)
            if device.type not in runs_on:
                raise LongVAError(f"the {phase} kernel {name!r} runs on {' and '.join(runs_on)}, not {device.type}; choose another with --attn.")



def _devices(name: str) -> tuple[str, ...]:
    return BACKENDS[name][1] if name in BACKENDS else ("cuda", "cpu")


# ---- the choice each attention module runs with ------------------------------------------------------------


def use_kernels(language_model: torch.nn.Module, choice: KernelChoice) -> None:
    """Make every attention module of `language_model` run `choice` (kept on the modules, not the config)."""
    for module in language_model.modules():
        if hasattr(module, "num_key_value_groups"):
            module.longva_kernels = choice


def kernels_of(module: torch.nn.Module) -> KernelChoice:
    return getattr(module, "longva_kernels", KernelChoice())


# ---- measuring -----------------------------------------------------------------------------------------


def shape_class(phase: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, queries: int, keys: int) -> str:
    """The key a measured choice is kept under: counts rounded up to powers of two."""
    return f"{phase} {str(dtype).removeprefix('torch.')} h{heads}/kv{kv_heads} d{head_dim} q{_power_of_two(queries)} k{_power_of_two(keys)}"


def _power_of_two(count: int) -> int:
    return 1 << max(count - 1, 0).bit_length()


def choose(phase: str, named: str, device: torch.device, shape: str, run: Callable[[str], torch.Tensor]) -> str:
    """The kernel to run: `named`, or (for `auto`) the measured fastest for `shape` on `device`.

    `run(name)` computes the call's result with that kernel (without side effects). Only CUDA
    is measured; elsewhere `auto` is what longva did before.
    """
    if named != AUTO:
        return named
    if device.type != "cuda":
        return BEFORE[phase]
    key = f"{device_name(device)} | {shape}"
    record = STORE.get(key)
    if record is None:
        record = measure(MEASURED[phase], run, lambda call: _median_ms(call, device))
        STORE.put(key, record)
    return record["choice"]


def measure(candidates: tuple[str, ...], run: Callable[[str], torch.Tensor], timer: Callable[[Callable[[], object]], float]) -> dict:
    """Time each candidate with `timer` (milliseconds a call takes), after a first run checked
    against the first candidate's result; the fastest is the choice.

    Returns {"choice", "ms": {name: milliseconds}, "rejected": {name: why}}.
    """
    reference = run(candidates[0])
    expected = reference.float()
    tolerance = (2e-2 if reference.dtype in (torch.float16, torch.bfloat16) else 1e-4) * max(1.0, float(expected.abs().max()))
    timings, rejected = {}, {}
    for name in candidates:
        try:
            error = float((run(name).float() - expected).abs().max())
            if not error <= tolerance:
                rejected[name] = f"differs from {candidates[0]} by {error:.3g} (allowed {tolerance:.3g})"
                continue
            timings[name] = round(timer(lambda: run(name)), 4)
        except Exception as error:  # a kernel this build or device lacks, a shape it refuses, memory: set it aside
            rejected[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
    if not timings:
        raise RuntimeError(f"no attention kernel ran: {rejected}")
    return {"choice": min(timings, key=timings.get), "ms": timings, "rejected": rejected}


def _median_ms(call: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    """The device and the software whose kernels were measured: a choice is kept per this."""
    if device.type != "cuda":
        return f"cpu | torch {torch.__version__}"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | cudnn {cudnn}"


class ChoiceStore:
    """Measured choices, in memory and in `kernels.json` of the user's cache folder."""

    def __init__(self) -> None:
        self.memory: dict[tuple[Path, str], dict] = {}

    @staticmethod
    def path() -> Path:
        return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "longva" / "kernels.json"

    def read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path().read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict | None:
        path = self.path()
        if (path, key) not in self.memory:
            record = self.read().get(key)
            if record is None:
                return None
            self.memory[path, key] = record
        return self.memory[path, key]

    def put(self, key: str, record: dict) -> None:
        """Keep `record` (the file is rewritten whole and replaced atomically; a failed write only costs a re-measure)."""
        path = self.path()
        self.memory[path, key] = record
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            records = {**self.read(), key: {**record, "measured": time.strftime("%Y-%m-%d")}}
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(handle, "w") as out:
                json.dump(records, out, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except OSError:
            pass


STORE = ChoiceStore()


def measured() -> dict[str, dict]:
    """The choices this process made or read, by device and shape class (what a benchmark reports)."""
    return {key: record for (_, key), record in STORE.memory.items()}
