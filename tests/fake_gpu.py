"""A stand-in GPU for machines without one: torch.cuda, and the torch.accelerator queries torch's own code
makes, answer as one coherent GPU would, so the device and dtype choices can be tested anywhere. Once it
is installed nothing real from torch.cuda is called, so it works the same with CPU and CUDA builds of torch
(a CUDA build without a driver raises "Found no NVIDIA driver" from any real query). Nothing can run on it:
it is for the choices made before any CUDA tensor exists. conftest.py's fake_gpu fixture installs it in a
test, its fake_gpu_env fixture in the scripts a test runs (through a sitecustomize.py)."""

import types

import torch


def install(name='NVIDIA A100-SXM4-80GB', capability=(8, 0), count=1, setattr=setattr):
    """Make torch see `count` GPUs called `name` of compute capability `capability`. setattr is a test's
    monkeypatch.setattr (undone after the test) or the builtin one (for the rest of the process)."""
    properties = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1])

    def get_device_properties(device=None):
        # device as torch.cuda's functions take it: None (the current one), N, 'cuda', 'cuda:N' or a torch.device
        index = device if isinstance(device, int) else torch.device(device or 'cuda').index or 0
        if not 0 <= index < count:
            raise AssertionError("Invalid device id")  # as torch.cuda says it
        return properties

    def get_device_capability(device=None):
        gpu = get_device_properties(device)
        return gpu.major, gpu.minor

    def is_bf16_supported(including_emulation=True):
        # as torch decides it: native from Ampere (8.0) on, and any CUDA GPU can emulate it
        return capability >= (8, 0) or including_emulation

    fakes = {
        'is_available': lambda: True,
        'device_count': lambda: count,
        'current_device': lambda: 0,
        'get_device_properties': get_device_properties,
        'get_device_name': lambda device=None: get_device_properties(device).name,
        'get_device_capability': get_device_capability,
        'is_bf16_supported': is_bf16_supported,
        'is_current_stream_capturing': lambda: False,  # torch 2.9's optimizer step asks; later ones torch.accelerator
    }
    for attr, fake in fakes.items():
        setattr(torch.cuda, attr, fake)
    # torch's own code asks torch.accelerator (an optimizer's step: is a CUDA graph being captured?); a CPU
    # build would say there is no accelerator, a CUDA build would ask the driver: both now see this GPU, idle
    idle_stream = types.SimpleNamespace(is_capturing=lambda: False)
    setattr(torch.accelerator, 'current_accelerator', lambda check_available=False: torch.device('cuda'))
    setattr(torch.accelerator, 'current_device_index', lambda: 0)
    setattr(torch.accelerator, 'current_stream', lambda device=None: idle_stream)


def sitecustomize_source(name, capability, count):
    """A sitecustomize.py that installs this same fake in every Python process started with its folder on
    PYTHONPATH."""
    return ("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('fake_gpu', {__file__!r})\n"
            "fake_gpu = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(fake_gpu)\n"
            f"fake_gpu.install({name!r}, {tuple(capability)!r}, {count!r})\n")
