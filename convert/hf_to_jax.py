#!/usr/bin/env python
"""Hugging Face (or original-repository) LLaVA directory -> llava-jax model directory.

The same as `llava-jax convert hf-to-jax`:

    python convert/hf_to_jax.py --hf DIR --out DIR [--dtype bfloat16] [--allow-pickle]
    python convert/hf_to_jax.py --hf ORIGINAL_DIR --out DIR [--vision DIR] [--conv-mode NAME]
"""

import sys
from pathlib import Path

# Runnable from a checkout that is not pip-installed (the package sits one folder up).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_jax.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-jax", *sys.argv[1:]]))
