"""Attention kernels (`longva_cli.model.kernels`) and how one is chosen (`longva_cli.model.kernel_choice`).

Every kernel is checked against PyTorch's plain SDPA on CPU float32: a chunk after a cached past
(split at the past, merged by log-sum-exp) against one lower-right causal call, and one decoded
query against a mask-free call, over grouped-query shapes and lengths that divide nothing.
The choice of kernel is tested with a fake timer: no test depends on how fast anything runs.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from longva_cli.errors import LongVAError
from longva_cli.model import kernel_choice, kernels
from longva_cli.model.kernel_choice import KernelChoice

# FlexAttention runs eagerly on the CPU (compiled, it takes tens of seconds): it says so once
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# (batch, kv heads, query heads per KV head, head dim): multi-head, GQA 7:1 (Qwen2-7B's), multi-query
SHAPES = [(1, 4, 1, 16), (1, 2, 7, 32), (2, 1, 4, 8)]


def qkv(batch, kv, groups, d, queries, keys, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv * groups, queries, d, generator=generator)
    key, value = (torch.randn(batch, kv, keys, d, generator=generator) for _ in range(2))
    return query, key, value


def reference(query, key, value, groups):
    """Plain SDPA, heads repeated: the last q positions over all n keys, lower-right causal."""
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bias = causal_lower_right(query.shape[2], key.shape[2]) if query.shape[2] > 1 else None
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias)


@pytest.mark.parametrize("backend", ["cpu-flash", "math", "flex"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("queries,past", [(2, 1), (37, 5), (64, 200), (129, 1000)])
def test_split_prefill_equals_one_lower_right_sdpa_call(backend, shape, queries, past):
    batch, kv, groups, d = shape
    query, key, value = qkv(batch, kv, groups, d, queries, past + queries)
    out = kernels.split_prefill(query, key, value, groups=groups, scale=None, backend=backend)
    torch.testing.assert_close(out, reference(query, key, value, groups), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["cpu-flash", "math", "flex", "gemm"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keys", [1, 3, 250, 4097])
def test_decode_kernels_equal_sdpa(kernel, shape, keys):
    batch, kv, groups, d = shape
    query, key, value = qkv(batch, kv, groups, d, 1, keys)
    if kernel == "gemm":
        out = kernels.gemm_decode(query, key, value, groups=groups, scale=None)
    else:
        out = kernels.decode_attention(query, key, value, groups=groups, scale=None, backend=kernel)
    torch.testing.assert_close(out, reference(query, key, value, groups), rtol=1e-5, atol=1e-5)


def test_merging_partials_equals_attention_over_the_union():
    query, key, value = qkv(1, 2, 1, 8, 5, 40)
    whole = kernels.attend("math", query, key, value, causal=False, scale=None)
    first = kernels.attend("math", query, key[:, :, :13], value[:, :, :13], causal=False, scale=None)
    second = kernels.attend("math", query, key[:, :, 13:], value[:, :, 13:], causal=False, scale=None)
    merged = kernels.merge_partials(first, second)
    torch.testing.assert_close(merged[0], whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[1], whole[1], rtol=1e-5, atol=1e-5)


def test_grouped_heads_fold_into_rows_and_back():
    query = torch.randn(2, 12, 5, 4)
    folded = kernels.fold_groups(query, 3)  # [2, 4, 15, 4]
    assert folded.shape == (2, 4, 15, 4)
    torch.testing.assert_close(folded[1, 2, 1 * 5 + 3], query[1, 2 * 3 + 1, 3])  # row g * q + i is head kv * g + g, position i
    torch.testing.assert_close(kernels.unfold_groups(folded, 3), query)


# ---- choosing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attn,expected",
    [("auto", ("auto", "auto")), ("sdpa", ("lower-right", "sdpa")), ("cudnn", ("cudnn", "cudnn")), ("math/gemm", ("math", "gemm"))],
)
def test_attn_names_a_kernel_per_phase(attn, expected):
    choice = KernelChoice.parse(attn)
    assert (choice.prefill, choice.decode) == expected


@pytest.mark.parametrize("attn", ["fast", "gemm", "cudnn/lower-right", "a/b/c"])
def test_unknown_kernels_are_refused_in_one_sentence(attn):
    with pytest.raises(LongVAError, match="--attn .* is not known"):
        KernelChoice.parse(attn)


def test_a_cuda_kernel_is_refused_on_the_cpu():
    with pytest.raises(LongVAError, match="runs on cuda, not cpu"):
        KernelChoice.parse("cudnn").check(torch.device("cpu"))
    KernelChoice.parse("cpu-flash/gemm").check(torch.device("cpu"))  # these run here


def fake_timer(milliseconds: dict[str, float]):
    """A timer that reports `milliseconds[kernel]` for the kernel the timed call runs."""
    last = []

    def run(kernel: str) -> torch.Tensor:
        last.append(kernel)
        return torch.ones(3) * (2.0 if kernel == "wrong" else 1.0)

    def timer(call) -> float:
        call()
        return milliseconds[last[-1]]

    return run, timer


def test_measuring_keeps_the_fastest_kernel_that_agrees_with_the_reference():
    run, timer = fake_timer({"slow": 5.0, "fast": 1.0, "wrong": 0.1})

    def run_or_fail(kernel):
        if kernel == "missing":
            raise RuntimeError("No available kernel.\nmore")
        return run(kernel)

    record = kernel_choice.measure(("slow", "fast", "wrong", "missing"), run_or_fail, timer)
    assert record["choice"] == "fast"
    assert record["ms"] == {"slow": 5.0, "fast": 1.0}
    assert "differs from slow" in record["rejected"]["wrong"]
    assert record["rejected"]["missing"] == "RuntimeError: No available kernel."


def test_auto_measures_a_shape_once_per_device_and_remembers_it_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "STORE", kernel_choice.ChoiceStore())
    monkeypatch.setattr(kernel_choice, "device_name", lambda device: "Fake GPU | torch x | cudnn y")
    run, timer = fake_timer({"sdpa": 3.0, "flash": 2.0, "cudnn": 1.0, "efficient": 4.0, "gemm": 9.0})
    measured = []
    monkeypatch.setattr(kernel_choice, "_median_ms", lambda call, device: (measured.append(1), timer(call))[1])
    cuda = torch.device("cuda")
    assert kernel_choice.choose("decode", "auto", cuda, "decode shape", run) == "cudnn"
    timings = len(measured)
    assert timings == len(kernel_choice.MEASURED["decode"])
    assert kernel_choice.choose("decode", "auto", cuda, "decode shape", run) == "cudnn"
    assert len(measured) == timings  # remembered in memory
    monkeypatch.setattr(kernel_choice, "STORE", kernel_choice.ChoiceStore())  # a new process
    assert kernel_choice.choose("decode", "auto", cuda, "decode shape", run) == "cudnn"
    assert len(measured) == timings  # read back from kernels.json
    saved = (tmp_path / "longva" / "kernels.json").read_text()
    assert "Fake GPU | torch x | cudnn y | decode shape" in saved
    assert kernel_choice.choose("decode", "flash", cuda, "decode shape", run) == "flash"  # a named kernel is not measured


def test_auto_on_the_cpu_is_what_longva_did_before_and_measures_nothing():
    def run(kernel):
        raise AssertionError("nothing is run to choose on the CPU")

    cpu = torch.device("cpu")
    assert kernel_choice.choose("prefill", "auto", cpu, "s", run) == "lower-right"
    assert kernel_choice.choose("decode", "auto", cpu, "s", run) == "sdpa"


def test_shape_classes_round_lengths_up_to_powers_of_two():
    assert kernel_choice.shape_class("decode", torch.bfloat16, 28, 4, 128, 1, 432_039) == "decode bfloat16 h28/kv4 d128 q1 k524288"
    assert kernel_choice.shape_class("prefill", torch.float32, 8, 2, 64, 4096, 4097) == "prefill float32 h8/kv2 d64 q4096 k8192"
