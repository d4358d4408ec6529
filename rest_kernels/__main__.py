"""`python -m rest_kernels info`: the backends, their status, and how the extension was built."""
import argparse
import platform
import sys

import torch

from . import __version__, _extension, available_backends, default_backend


def info() -> str:
    lines = [f"rest_kernels {__version__}", f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'}), {platform.machine()}"]
    if torch.cuda.is_available():
        lines.append("GPU: " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        lines.append("GPU: none visible")
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # report, don't fail
        lines.append(f"triton: not importable ({e})")
    lines.append(f"default backend: {default_backend()}")
    lines.append("backends:")
    for name, reason in available_backends().items():
        lines.append(f"  {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    built = _extension.build_info()
    if built is None:
        lines.append(f"compiled extension: {_extension.unavailable_reason()}")
    else:
        lines.append("compiled extension built with: " + ", ".join(f"{k}={v!r}" for k, v in built.items()))
        lines.append(f"cpu kernels: {_extension.cpu_isa_description()}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rest_kernels")
    parser.add_argument("command", choices=["info"], help="what to print")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
