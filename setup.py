"""Build and install anml_fast.

The compiled extension `anml_fast._C` is built from csrc/ when it holds sources: always as a C++
(CPU) extension, and with its CUDA sources when a CUDA toolkit is found (CUDA_HOME, or
FORCE_CUDA=1), never by asking whether a GPU is present. ANML_FAST_NO_EXT=1 skips it; the package
then runs on its plain-PyTorch twins. TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("ANML_FAST_NO_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    from torch.utils import cpp_extension

    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = bool(cu) and (os.environ.get("FORCE_CUDA") == "1" or cpp_extension.CUDA_HOME is not None)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    args = {"cxx": ["-O3", "-std=c++20"]}
    if with_cuda:
        args["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        ext = cpp_extension.CUDAExtension("anml_fast._C", cpp + cu, extra_compile_args=args,
                                          define_macros=[("ANML_FAST_WITH_CUDA", "1")])
    else:
        ext = cpp_extension.CppExtension("anml_fast._C", cpp, extra_compile_args={"cxx": args["cxx"]})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="anml_fast",
    version="0.1.0",
    description="ANML (neuromodulated meta-learning for continual learning) on Omniglot, fast",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["anml_fast", "anml_fast.*"]) + ["anml_fast.kernels"],
    package_dir={"anml_fast.kernels": "kernels"},
    # the shipped meta-trained models (anml_fast/pretrained/<name>/: manifest.json + safetensors shards)
    package_data={"anml_fast": ["pretrained/*/*.json", "pretrained/*/*.safetensors"]},
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "safetensors>=0.4",
        "tqdm",
        "tensorboard",
        "matplotlib",
        # the Triton kernels (kernels/); CUDA builds of torch bring it, and without it the ops
        # fall back to their twins
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["anml-fast = anml_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
