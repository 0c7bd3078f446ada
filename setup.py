from setuptools import find_packages, setup

# Triton 3.6's interpreter (the CPU test tier) breaks on numpy >= 2.4; the GPU image has triton 3.6.
TEST_TRITON = ["triton==3.6.0; platform_system == 'Linux'", "numpy<2.4"]
TRAIN = ["transformers>=4.53", "safetensors", "pillow", "tqdm", "matplotlib"]
BENCH = ["matplotlib", "pytest-benchmark"]

setup(
    name="llavit-kernels",
    version="0.1.0",
    description="Triton kernels and drop-in modules for LLaViT-style multimodal LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llavit_kernels", "llavit_kernels.*"]) + ["llavit_kernels.csrc"],
    # csrc/ (the C++ CPU kernel, compiled on first use) ships inside the package as llavit_kernels/csrc.
    package_dir={"llavit_kernels.csrc": "csrc"},
    package_data={"llavit_kernels.csrc": ["*.cpp", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "triton>=3.6.0; platform_system == 'Linux'",
        "einops",
        "ninja",  # builds csrc/ on first CPU use (torch.utils.cpp_extension.load)
    ],
    extras_require={
        "train": TRAIN,
        "bench": BENCH,
        "dev": sorted(set(TRAIN + BENCH + TEST_TRITON + ["pytest", "hypothesis", "peft>=0.15"])),
    },
    entry_points={"console_scripts": ["llavit-train=llavit_kernels.train.__main__:main"]},
)
