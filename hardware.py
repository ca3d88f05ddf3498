"""
What the scripts need to know about the machine: the best device, the dtypes it can do, the autocast
context for mixed precision, its peak FLOP/s for MFU, and the memory a process holds.
"""

import re
import sys
import time
from contextlib import nullcontext

import torch

from configurator import UserError

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# dense peak FLOP/s (no sparsity) by GPU name and dtype; float32 means TF32 tensor cores. A name matches as
# whole words, and the longest match wins: an L40S is no L4, an H100 NVL no H100 SXM ("NVIDIA H100 80GB HBM3")
GPU_PEAK_FLOPS = {
    'H200': {'bfloat16': 989e12, 'float16': 989e12, 'float32': 495e12},
    'H100': {'bfloat16': 989e12, 'float16': 989e12, 'float32': 495e12},
    'H100 PCIe': {'bfloat16': 756e12, 'float16': 756e12, 'float32': 378e12},
    'H100 NVL': {'bfloat16': 835e12, 'float16': 835e12, 'float32': 418e12},
    'A100': {'bfloat16': 312e12, 'float16': 312e12, 'float32': 156e12},
    'A10G': {'bfloat16': 70e12, 'float16': 70e12, 'float32': 35e12},
    'L40S': {'bfloat16': 362e12, 'float16': 362e12, 'float32': 183e12},
    'L40': {'bfloat16': 181e12, 'float16': 181e12, 'float32': 90.5e12},
    'L4': {'bfloat16': 121e12, 'float16': 121e12, 'float32': 60e12},
    'RTX 4090': {'bfloat16': 165e12, 'float16': 165e12, 'float32': 83e12},
    'RTX 3090': {'bfloat16': 71e12, 'float16': 71e12, 'float32': 36e12},
    'V100': {'float16': 125e12, 'float32': 15.7e12},
    'T4': {'float16': 65e12, 'float32': 8.1e12},
}


def best_device():
    if torch.cuda.is_available():
        return 'cuda'
    if torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def best_dtype(device):
    """bfloat16 on GPUs that compute in it (Ampere and later), float16 (with a gradient scaler) on those that
    would only emulate it (T4, V100); float32 on CPU and MPS, faster there at this repository's sizes."""
    if device.startswith('cuda'):
        return 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
    return 'float32'


def check_device(device, dtype):
    """The device type and the dtype a run will use ('auto' resolved), or one clear line, instead of an error
    from deep inside torch, for a device or dtype we cannot use."""
    if dtype != 'auto' and dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use auto or one of {', '.join(DTYPES)}")
    device_type, colon, index = device.partition(':')
    if device_type not in ('cpu', 'cuda', 'mps') or colon and not index.isdigit():
        raise UserError(f"unknown device '{device}'; use cpu, cuda, cuda:N or mps")
    dtype = best_dtype(device_type) if dtype == 'auto' else dtype
    if device_type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' requested but CUDA is not available on this machine; use --device=cpu")
        index = int(index) if index else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device '{device}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UserError(f"this GPU ({torch.cuda.get_device_name(index)}) has no bfloat16 arithmetic (it would "
                            "be emulated, several times slower); use --dtype=float16")
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on TF32 tensor cores (Ampere and later)
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == 'mps':
        if not torch.backends.mps.is_available():
            raise UserError(f"device '{device}' requested but MPS is only available on Apple silicon Macs; use --device=cpu")
        if dtype == 'bfloat16' and not torch.backends.mps.is_macos_or_newer(14, 0):  # MPS autocast's condition
            raise UserError("bfloat16 on MPS needs macOS 14 or later; use --dtype=float16 or float32")
    return device_type, dtype


def dtype_default(device, dtype, user_keys):
    """dtype as set, else the best one of the device given: the default (as --help shows it) is the best device's,
    and --device=cpu on a GPU machine makes it float32."""
    return dtype if 'dtype' in user_keys else best_dtype(device)


def compile_default(device, compile, user_keys):
    """torch.compile as set, or by default on CUDA only: on CPUs its start-up cost outweighs the gain here."""
    return compile if 'compile' in user_keys else device.startswith('cuda')


def autocast_context(device_type, dtype):
    """Mixed precision on every device: matmuls in dtype, the precision-sensitive rest (softmax, norms, the loss)
    in float32, as torch's autocast decides; nothing for float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=DTYPES[dtype])


def peak_flops(device, dtype):
    """Peak FLOP/s of the device in use and where that figure comes from: the GPU's datasheet, looked up by
    name, or elsewhere (CPUs above all) the best of a few large matmuls measured now."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        known = [gpu for gpu in GPU_PEAK_FLOPS if re.search(rf'(?<!\w){re.escape(gpu)}(?!\w)', name)]
        gpu = max(known, key=len, default=None)
        if gpu and dtype in GPU_PEAK_FLOPS[gpu]:
            return GPU_PEAK_FLOPS[gpu][dtype], f"{gpu} {dtype} datasheet peak"
    flops = measured_matmul_flops(device, DTYPES[dtype])
    return flops, f"measured with {dtype} matmuls at start-up"


def measured_matmul_flops(device, dtype, n=1024, repeats=5):
    """The FLOP/s of the fastest of `repeats` n x n matmuls: the best, because on a shared machine other
    work can only slow a matmul down, and a peak that is too low would make MFU read above 100%."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best = float('inf')
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_memory(device):
    """Peak memory so far: allocated by PyTorch on CUDA, else the whole process's peak resident set."""
    if device.startswith('cuda'):
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated (torch.cuda)"
    try:
        import resource
    except ImportError:  # Windows
        return "unknown (no resource module)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)
    return f"{rss / 2**30:.2f} GiB peak RSS of the process"


def held_memory(model, optimizers):
    """The MiB of parameters, gradients and optimizer state this process holds (under FSDP: its shards)."""
    from torch.distributed.tensor import DTensor  # (here: its import costs every script a second at start-up)
    def mib(tensors):
        return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors) / 2**20
    params = list(model.parameters())
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return (f"parameters {mib(params):,.1f} MiB, gradients {mib(p.grad for p in params if p.grad is not None):,.1f} "
            f"MiB, optimizer state {mib(state):,.1f} MiB")


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    elif device.startswith('mps'):
        torch.mps.synchronize()


def compile_failure(warm_up):
    """None if warm_up() (the first calls of a torch.compile'd model, which compile it) runs, else why not in one
    line: a machine without a working Triton or C++ compiler, say, or a graph the compiler rejects."""
    try:
        warm_up()
    except Exception as e:  # the compilers' errors share no type worth naming
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return ' '.join(lines[:2])[:300] or type(e).__name__
    return None
