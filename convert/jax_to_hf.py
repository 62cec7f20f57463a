#!/usr/bin/env python
"""llava-jax model directory -> Hugging Face directory that transformers loads.

The same as `llava-jax convert jax-to-hf`:

    python convert/jax_to_hf.py --ckpt DIR --out DIR [--max-shard-size 5GB]
"""

import sys
from pathlib import Path

# Runnable from a checkout that is not pip-installed (the package sits one folder up).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_jax.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "jax-to-hf", *sys.argv[1:]]))
