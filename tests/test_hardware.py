"""hardware.py: the dtype a run gets on each device, the one-line refusals, the autocast context and the
peak FLOP/s behind MFU. GPUs are faked (conftest's fake_gpu), so every case runs on any machine; the
oracles are NVIDIA's datasheets (peak FLOP/s) and compute capabilities (bfloat16 arithmetic from 8.0)."""

from contextlib import nullcontext

import pytest
import torch

import hardware
from configurator import UserError

# the compute capability of each GPU, from NVIDIA's list of CUDA GPUs
CAPABILITY = {
    'Tesla V100-SXM2-16GB': (7, 0), 'Tesla T4': (7, 5), 'NVIDIA A100-SXM4-80GB': (8, 0),
    'NVIDIA GeForce RTX 4090': (8, 9), 'NVIDIA L4': (8, 9), 'NVIDIA L40': (8, 9), 'NVIDIA L40S': (8, 9),
    'NVIDIA H100 80GB HBM3': (9, 0), 'NVIDIA H100 PCIe': (9, 0), 'NVIDIA H100 NVL': (9, 0), 'NVIDIA H200': (9, 0),
}


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize('name, expected', [
    ('Tesla V100-SXM2-16GB', 'float16'), ('Tesla T4', 'float16'),  # would only emulate bfloat16
    ('NVIDIA A100-SXM4-80GB', 'bfloat16'), ('NVIDIA H100 80GB HBM3', 'bfloat16'),
])
def test_auto_dtype_is_bfloat16_where_the_gpu_computes_it_else_float16(fake_gpu, name, expected):
    fake_gpu(name, CAPABILITY[name])
    assert hardware.check_device('cuda', 'auto') == ('cuda', expected)


def test_bfloat16_on_a_gpu_that_would_emulate_it_is_one_line_naming_float16(fake_gpu):
    fake_gpu('Tesla T4', CAPABILITY['Tesla T4'])
    with pytest.raises(UserError) as info:
        hardware.check_device('cuda', 'bfloat16')
    message = str(info.value)
    assert '\n' not in message and 'Tesla T4' in message and 'bfloat16' in message and '--dtype=float16' in message


@pytest.mark.parametrize('name', ['Tesla V100-SXM2-16GB', 'Tesla T4', 'NVIDIA A100-SXM4-80GB', 'NVIDIA H100 80GB HBM3'])
@pytest.mark.parametrize('dtype', ['float16', 'float32'])
def test_float16_and_float32_are_accepted_on_every_gpu(fake_gpu, name, dtype):
    fake_gpu(name, CAPABILITY[name])
    assert hardware.check_device('cuda', dtype) == ('cuda', dtype)


def test_a_gpu_index_beyond_the_machine_is_one_line_with_the_count(fake_gpu):
    fake_gpu(count=2)
    assert hardware.check_device('cuda:1', 'auto') == ('cuda', 'bfloat16')
    with pytest.raises(UserError, match=r"device 'cuda:2' does not exist; this machine has 2 CUDA device\(s\)"):
        hardware.check_device('cuda:2', 'auto')


@pytest.mark.parametrize('device', ['cpu', 'mps'])
def test_cpu_and_mps_run_float32_by_default_and_the_dtype_asked_for_otherwise(monkeypatch, device):
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)  # an Apple silicon Mac, for mps
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer', lambda major, minor: True)
    assert hardware.check_device(device, 'auto') == (device, 'float32')
    for dtype in ('bfloat16', 'float16', 'float32'):
        assert hardware.check_device(device, dtype) == (device, dtype)


def test_bfloat16_on_mps_before_macos_14_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer', lambda major, minor: (major, minor) <= (13, 0))
    with pytest.raises(UserError, match='macOS 14'):
        hardware.check_device('mps', 'bfloat16')
    assert hardware.check_device('mps', 'float16') == ('mps', 'float16')


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_autocast_on_cpu_computes_matmuls_in_the_dtype(dtype):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with hardware.autocast_context('cpu', dtype):
        assert (a @ b).dtype == hardware.DTYPES[dtype]


def test_float32_needs_no_autocast():
    context = hardware.autocast_context('cpu', 'float32')
    assert isinstance(context, nullcontext)
    with context:
        assert (torch.randn(8, 8, dtype=torch.float32) @ torch.randn(8, 8)).dtype == torch.float32


# ----------------------------------------------------------------------------- peak FLOP/s

@pytest.mark.parametrize('name, dtype, row, expected', [
    ('NVIDIA H200', 'bfloat16', 'H200', 989e12),
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 'H100', 989e12),  # the SXM H100
    ('NVIDIA H100 80GB HBM3', 'float16', 'H100', 989e12),
    ('NVIDIA H100 PCIe', 'bfloat16', 'H100 PCIe', 756e12),
    ('NVIDIA H100 NVL', 'bfloat16', 'H100 NVL', 835e12),
    ('NVIDIA A100-SXM4-80GB', 'float32', 'A100', 156e12),  # TF32
    ('NVIDIA GeForce RTX 4090', 'bfloat16', 'RTX 4090', 165e12),
    ('NVIDIA L40S', 'bfloat16', 'L40S', 362e12),  # no L40 and no L4
    ('NVIDIA L40', 'bfloat16', 'L40', 181e12),  # no L4
    ('NVIDIA L4', 'bfloat16', 'L4', 121e12),
    ('Tesla T4', 'float16', 'T4', 65e12),
])
def test_peak_flops_looks_up_the_gpu_in_use_by_name_and_dtype(fake_gpu, monkeypatch, name, dtype, row, expected):
    fake_gpu(name, CAPABILITY[name])
    monkeypatch.setattr(hardware, 'measured_matmul_flops', lambda *a, **k: pytest.fail('should use the table'))
    assert hardware.peak_flops('cuda', dtype) == (expected, f"{row} {dtype} datasheet peak")


@pytest.mark.parametrize('name, capability', [
    ('Some Future GPU', (10, 0)),  # not in the table
    ('Tesla V100-SXM2-16GB', CAPABILITY['Tesla V100-SXM2-16GB']),  # no bfloat16 in their rows
    ('Tesla T4', CAPABILITY['Tesla T4']),
])
def test_peak_flops_of_an_unknown_gpu_or_dtype_is_measured(fake_gpu, monkeypatch, name, capability):
    fake_gpu(name, capability)
    measured = []

    def measured_matmul_flops(device, dtype):
        measured.append((device, dtype))
        return 123.0
    monkeypatch.setattr(hardware, 'measured_matmul_flops', measured_matmul_flops)
    assert hardware.peak_flops('cuda', 'bfloat16') == (123.0, 'measured with bfloat16 matmuls at start-up')
    assert measured == [('cuda', torch.bfloat16)]


def test_measured_cpu_peak_is_the_flops_of_a_matmul():
    flops = hardware.measured_matmul_flops('cpu', torch.float32, n=256, repeats=2)
    assert 1e8 < flops < 1e14  # a real rate: more than 0.1 GFLOP/s, less than any CPU's peak
