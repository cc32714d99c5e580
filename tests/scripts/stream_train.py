"""The CLI's streaming path: which training examples each rank reads, then a real CLI run.

Run with ``HF_ENDPOINT`` pointing at a Hub that serves ``uoft-cs/cifar10``:

* ``stream_train.py launched <dump> <cli args>`` under a launcher: iterates the Trainer's training
  dataloader for epochs 0 and 1 and writes ``<dump>.rank<R>.pt`` with one (label, pixel digest) key per
  example in reading order, then runs ``bimask_hf.train.main`` on the same arguments.
* ``stream_train.py expected <dump> <cli args>`` in one process: the keys ``split_dataset_by_node`` gives
  ranks 0 and 1 of 2, the whole stream through ``datasets.load_dataset(..., streaming=True)``, then a
  single-process CLI run.
"""

from __future__ import annotations

import hashlib
import sys

import datasets
import torch

from bimask_hf import load_image_classification_data
from bimask_hf.train import build, main, parse_args


def key(pixels: torch.Tensor, label: int) -> tuple[int, str]:
    """An example's label and a digest of its pixels."""
    return int(label), hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


def launched(dump: str, argv: list[str]) -> None:
    data, trainer = build(*parse_args(argv))
    loader = trainer.get_train_dataloader()
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen[epoch] = [key(p, lab) for batch in loader for p, lab in zip(batch["pixel_values"], batch["labels"])]
    torch.save({"seen": seen, "world_size": trainer.args.world_size}, f"{dump}.rank{trainer.args.process_index}.pt")
    main(argv)


def expected(dump: str, argv: list[str]) -> None:
    model_args, data_args, train_args = parse_args(argv)
    seen = {}
    for rank in (0, 1):
        data = load_image_classification_data(
            data_args.dataset, model=model_args.model, streaming=True, recipe=data_args.recipe,
            shuffle_buffer=data_args.shuffle_buffer, seed=train_args.seed, rank=rank, world_size=2,
        )
        for epoch in (0, 1):
            data.train_dataset.set_epoch(epoch)
            seen[rank, epoch] = [key(e["pixel_values"], e["labels"]) for e in data.train_dataset]
    raw = datasets.load_dataset("uoft-cs/cifar10", streaming=True, revision="main")
    stream = {split: [e["label"] for e in ds] for split, ds in raw.items()}
    features = raw["train"].features
    torch.save({"seen": seen, "stream": stream, "label_names": features["label"].names,
                "image_feature": type(features["img"]).__name__}, f"{dump}.pt")
    main(argv)


if __name__ == "__main__":
    {"launched": launched, "expected": expected}[sys.argv[1]](sys.argv[2], sys.argv[3:])
