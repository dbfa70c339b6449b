"""Writes a weights-only copy of a checkpoint (hyper-parameters + fp32 state dict) and prints its size and sha256.

    python scripts/weights_only.py runs/vision/mae_tiny_digits/version_0/checkpoints/best.ckpt weights/vision/mae_tiny_digits.ckpt
"""

import argparse
from pathlib import Path

from polyformer.checkpoint import save_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by `polyformer fit`")
    parser.add_argument("out", help="where the weights-only file goes (e.g. weights/<domain>/<name>.ckpt)")
    args = parser.parse_args()
    digest = save_weights(args.checkpoint, args.out)
    print(f"{args.out}  {Path(args.out).stat().st_size / 2**20:.2f} MB  sha256 {digest}")


if __name__ == "__main__":
    main()
