"""Build script. The CUDA extension ``muse_kernels._C`` is optional, as in flash-attention:

* ``MUSE_KERNELS_SKIP_CUDA_BUILD=1`` skips it;
* without a CUDA-enabled torch, or without ``nvcc``, it is skipped with a warning (never an error);
* ``MUSE_KERNELS_CUDA_ARCHS`` picks the target architectures (default ``"8.0;9.0"``);
* ``MAX_JOBS`` is honoured by torch's ninja build.

Without the extension the package works with its Triton and PyTorch backends.
"""

import glob
import os
import shutil
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    if os.environ.get("MUSE_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return None
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: building without the CUDA extension")
        return None
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        warnings.warn("torch without CUDA or no nvcc on PATH: building without the CUDA extension")
        return None
    archs = os.environ.get("MUSE_KERNELS_CUDA_ARCHS", "8.0;9.0")
    gencode = []
    for arch in filter(None, archs.replace(",", ";").split(";")):
        num = arch.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return CUDAExtension(
        name="muse_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},  # torch picks the C++ standard
    )


ext = _cuda_extension()
if ext is None:
    setup()
else:
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
