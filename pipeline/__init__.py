"""deepfake-gan: train a DCGAN on CelebA and use its discriminator as a deepfake detector.

The package is a library: nothing in it parses argv. Entry points live in `launch/`, `shards/`
(the offline sharding tool) and the `python -m pipeline.<tool>` modules.
"""

__version__ = "0.1.0"
