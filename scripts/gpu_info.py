#!/usr/bin/env python3
"""Print the versions and the device that a GPU check ran with (step 'device' of scripts/gpu_check.sh)."""
import platform
import sys


def main() -> int:
    print("python", platform.python_version(), sys.executable)
    for mod in ("numpy", "ml_dtypes", "torch", "cupy", "cupy_cosattn", "pytest", "matplotlib"):
        try:
            m = __import__(mod)
            print(f"{mod:13s} {getattr(m, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001
            print(f"{mod:13s} NOT IMPORTABLE: {type(e).__name__}: {e}")
    ok = True
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            l2 = getattr(p, "L2_cache_size", 0) / 2**20
            print(f"torch: CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {p.name}, "
                  f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
                  f"L2 {l2:.0f} MiB")
        else:
            print("torch: CUDA NOT AVAILABLE")
            ok = False
    except Exception as e:  # noqa: BLE001
        print(f"torch CUDA query failed: {type(e).__name__}: {e}")
        ok = False
    try:
        import cupy

        rt = cupy.cuda.runtime
        print(f"cupy: CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}, "
              f"{rt.getDeviceCount()} device(s)")
    except Exception as e:  # noqa: BLE001
        print(f"cupy CUDA query failed: {type(e).__name__}: {e}")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
