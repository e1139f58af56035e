#!/usr/bin/env python3
"""Your own CNN on CIFAR-10-format files, every stage unlocked by a local head.

    python examples/cifar_cnn.py --data-dir ~/data/cifar-10-batches-bin
    python examples/cifar_cnn.py --data-dir DIR --mode locked --steps 200
    python examples/cifar_cnn.py --data-dir DIR --device cuda --precision bf16   # on GPUs

The model is a function that builds an nn.Sequential (one entry per layer); synthgrad calls it
in every stage process with the data's sample shape and class count, splits it into stages by
cost, and hands the trained network back as one module.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

import synthgrad

# how synthgrad finds make() in every stage process: this file's module name
MODULE = Path(__file__).stem if __name__ == "__main__" else __name__


def make(input_shape, num_classes):
    """Three conv blocks and a classifier, for C x H x W images (H, W divisible by 8)."""
    c, h, w = input_shape

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(c, 32), block(32, 64), block(64, 128),
                         nn.Sequential(nn.Flatten(), nn.Linear(128 * (h // 8) * (w // 8), num_classes)))


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with data_batch_*.bin and test_batch.bin")
    p.add_argument("--mode", default="local")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu, cuda, or one per stage (cuda:0,cuda:1)")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16")
    p.add_argument("--out", default="runs/example-cifar")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = synthgrad.RunConfig(model=f"{MODULE}:make", dataset="cifar10", data_dir=args.data_dir, mode=args.mode,
                              stages=args.stages, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                              device=args.device, precision=args.precision, out=args.out)
    result = synthgrad.train(cfg)
    summary = result.summary
    print(synthgrad.format_summary(summary))
    model = result.model()
    print(f"trained network: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"layers per stage {summary['layout']['groups']}")
    return summary


if __name__ == "__main__":
    main()
