"""run.precision = 'auto': bf16 only where the hardware computes it natively."""

from __future__ import annotations

import pytest
import torch

from quest import build

AVX2_ONLY = "flags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512_BF16 = "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n"
AMX = "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"


@pytest.mark.parametrize(("text", "native"), [(AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, text, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + text)
    assert build.cpu_has_native_bf16(str(cpuinfo)) is native


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: native)
    precision, why = build.resolve_precision("auto", cuda=False)
    assert precision == expected and "CPU" in why


@pytest.mark.parametrize(("supported", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_on_cuda_follows_the_device(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert build.resolve_precision("auto", cuda=True)[0] == expected


@pytest.mark.parametrize("explicit", ["no", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(monkeypatch, explicit):
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: False)
    assert build.resolve_precision(explicit, cuda=False)[0] == explicit
