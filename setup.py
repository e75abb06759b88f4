"""neti-fast: fast NeTI / XTI / Textual Inversion for Stable Diffusion 1.x.

`kernels/`, `export/` and `bench/` live at the top of the repository (one folder per concern) and
install as `neti_fast.kernels`, `neti_fast.export` and `neti_fast.bench`, so that no generic
top-level names (`kernels`, `export`) land in site-packages.
"""
from setuptools import setup

setup(
    name="neti-fast",
    version="0.1.0",
    description="Fast NeTI / XTI / Textual Inversion training and batched inference for Stable Diffusion 1.x",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["neti_fast", "neti_fast.kernels", "neti_fast.export", "neti_fast.bench", "neti_fast.serve"],
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
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        "test": ["pytest>=8.0", "triton>=3.0", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1",
                 "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "httpx>=0.27", "webuiapi>=0.9",
                 "playwright>=1.40"],
    },
    entry_points={"console_scripts": ["neti-fast=neti_fast.cli:main"]},
)
