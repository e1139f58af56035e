#!/usr/bin/env python3
"""Your own Dataset: rows of a CSV file (label, then features) as a map-style dataset, trained
with the built-in MLP.

    python examples/csv_dataset.py --data-dir DIR      # DIR holds train.csv and test.csv

Any object with __len__ and __getitem__(i) -> (float tensor, class index) works; synthgrad reads
it a batch at a time in the same seeded order as its built-in sets, and checks every sample.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import synthgrad

MODULE = Path(__file__).stem if __name__ == "__main__" else __name__


class CsvRows:
    def __init__(self, path: Path):
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        self.labels = [int(r[0]) for r in rows]
        self.features = torch.tensor([[float(v) for v in r[1:]] for r in rows])
        self.num_classes = max(self.labels) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.features[i], self.labels[i]


def data(data_dir):
    folder = Path(data_dir)
    return CsvRows(folder / "train.csv"), CsvRows(folder / "test.csv")


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (tests/test_docs.py parses the documented commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--mode", default="local")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default="runs/example-csv")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    train, _ = data(args.data_dir)
    layers = (train.features.shape[1], args.hidden, args.hidden, train.num_classes)
    cfg = synthgrad.RunConfig(dataset=f"{MODULE}:data", data_dir=args.data_dir, layers=layers, mode=args.mode,
                              epochs=args.epochs, batch_size=32, out=args.out)
    _, summary = synthgrad.train(cfg)
    print(synthgrad.format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
