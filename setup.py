"""neti-fast: fast NeTI / XTI / Textual Inversion for Stable Diffusion (1.x, 2.x, SDXL).

`kernels/`, `export/` and `bench/` live at the top of the repository (one folder per concern) and
install as `neti_fast.kernels`, `neti_fast.export` and `neti_fast.bench`, so that no generic
top-level names (`kernels`, `export`) land in site-packages.

The native layer (`csrc/`, `CMakeLists.txt`) is built by CMake from `build_ext`, in the manner of
vLLM's setup.py: a `CMakeExtension` with no sources, configured and built in `build_temp`, its
outputs written next to where setuptools expects the extension (so `pip install .` packs them and
`pip install -e .` copies them into `neti_fast/`).  It is optional: without cmake, a C++ compiler
or an importable torch, or with NETI_FAST_NATIVE=0, the package installs without it (one line
says why, and `neti_fast/_native_build.txt` keeps the reason for `neti_fast.native` to report);
NETI_FAST_REQUIRE_NATIVE=1 turns a failed build into a failed install (CI).
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE_STATUS = "_native_build.txt"      # one line: "built" or "not built: <why>"
NATIVE_EXTRAS = ("libneti_fast_cuda.so", NATIVE_STATUS)  # outputs besides _C.so itself


def _flag(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = "."):
        super().__init__(name, sources=[])
        self.source_dir = os.path.abspath(source_dir)


def _torch_cmake_prefix() -> str:
    """torch's CMake config folder, from the torch that will import the extension.

    Under pip's build isolation `import torch` fails in this process (the target environment's
    site-packages are hidden), so the same interpreter is asked again with the isolation's
    variables removed: the extension must match the installed torch, not a copy pulled into the
    build environment (which could also be a CUDA wheel on a CPU machine).
    """
    try:
        import torch.utils

        return torch.utils.cmake_prefix_path
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    r = subprocess.run([sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"],
                       env=env, capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        raise RuntimeError("torch is not importable (install torch first)")
    return r.stdout.strip().splitlines()[-1]


class cmake_build_ext(build_ext):
    """Build `neti_fast._C` (and, where nvcc is found, libneti_fast_cuda.so) with CMake."""

    def get_ext_filename(self, fullname):
        # _C is not a Python module (no Python.h, no PyInit): plain `_C.so`, loaded with
        # torch.ops.load_library, the same file for every Python version.
        if fullname == "neti_fast._C":
            return os.path.join("neti_fast", "_C.so")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(out_dir, exist_ok=True)
        for name in ("_C.so",) + NATIVE_EXTRAS:  # no stale outputs of an earlier build
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        try:
            self._cmake(ext, out_dir)
            status = "built"
        except Exception as e:  # noqa: BLE001 - any failure falls back, with its reason
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            status = f"not built: {why}"
            if _flag("NETI_FAST_REQUIRE_NATIVE") in ("1", "true", "yes", "on"):
                raise RuntimeError(f"neti-fast: native extension {status} (NETI_FAST_REQUIRE_NATIVE=1)") from e
            print(f"neti-fast: native extension {status}; installing the pure-Python fallback",
                  file=sys.stderr, flush=True)
        with open(os.path.join(out_dir, NATIVE_STATUS), "w", encoding="utf-8") as f:
            f.write(status + "\n")

    def _cmake(self, ext, out_dir):
        if _flag("NETI_FAST_NATIVE") in ("0", "false", "no", "off"):
            raise RuntimeError("skipped (NETI_FAST_NATIVE=0)")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH")
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        cfg = [cmake, "-S", ext.source_dir, "-B", build_dir,
               "-DCMAKE_BUILD_TYPE=Release",
               f"-DTorch_DIR={os.path.join(_torch_cmake_prefix(), 'Torch')}",
               f"-DNETI_FAST_OUTPUT_DIR={out_dir}"]
        if _flag("NETI_FAST_CUDA") in ("0", "false", "no", "off"):
            cfg.append("-DNETI_FAST_CUDA=OFF")
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        log = os.path.join(build_dir, "neti_fast_build.log")
        with open(log, "w", encoding="utf-8") as f:
            for cmd in (cfg, [cmake, "--build", build_dir, "-j", jobs]):
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    raise RuntimeError(f"`{' '.join(cmd[:2])}` failed (exit {r.returncode}); log: {log}")
        if not os.path.exists(os.path.join(out_dir, "_C.so")):
            raise RuntimeError(f"CMake finished but produced no _C.so in {out_dir}")

    def copy_extensions_to_source(self):
        # Editable installs: setuptools copies _C.so itself; copy its companions too, and never
        # fail on a missing _C.so (the fallback case).
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            src_dir, dst_dir = os.path.dirname(regular_file), os.path.dirname(inplace_file)
            for name in (os.path.basename(regular_file),) + NATIVE_EXTRAS:
                src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
                if os.path.exists(src):
                    self.copy_file(src, dst, level=self.verbose)
                elif os.path.exists(dst):
                    os.remove(dst)  # stale output of an earlier build


setup(
    name="neti-fast",
    version="0.1.0",
    description="Fast NeTI / XTI / Textual Inversion training and batched inference for Stable Diffusion 1.x, 2.x and SDXL",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["neti_fast", "neti_fast.sd", "neti_fast.concepts", "neti_fast.engine", "neti_fast.training",
              "neti_fast.jobs", "neti_fast.evaluation", "neti_fast.serve",
              "neti_fast.kernels", "neti_fast.export", "neti_fast.bench"],
    package_data={"neti_fast.serve": ["static/*.html"]},
    package_dir={"neti_fast": "neti_fast", "neti_fast.kernels": "kernels",
                 "neti_fast.export": "export", "neti_fast.bench": "bench"},
    install_requires=[
        "torch>=2.4",            # torch.library.custom_op, weights_only safe_globals with (obj, name)
        "diffusers>=0.30",
        "transformers>=4.44",
        "safetensors>=0.4",
        "numpy>=1.24",
        "Pillow>=10.0",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "xformers": ["xformers>=0.0.27"],
        "tensorrt": ["tensorrt>=10.0"],
        # LMS and the Beta schedule need scipy, DPM++ SDE torchsde (diffusers imports them for those only)
        "samplers": ["scipy>=1.10", "torchsde>=0.2.6"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "scipy>=1.10", "torchsde>=0.2.6"],
        "tensorboard": ["tensorboard>=2.14"],   # neti-fast train --tensorboard
        # neti-fast serve --replicas / --autoscale (neti_fast/serve/ray_app.py); with the serve extra
        "ray": ["ray[serve]>=2.40", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "scipy>=1.10",
                "torchsde>=0.2.6"],
        "test": ["pytest>=8.0", "triton>=3.0", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1",
                 "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "httpx>=0.27", "webuiapi>=0.9",
                 "scipy>=1.10", "torchsde>=0.2.6", "playwright>=1.40", "tensorboard>=2.14", "ray[serve]>=2.40"],
    },
    entry_points={"console_scripts": ["neti-fast=neti_fast.cli:entry"]},
    ext_modules=[CMakeExtension("neti_fast._C")],
    cmdclass={"build_ext": cmake_build_ext},
    zip_safe=False,
)
