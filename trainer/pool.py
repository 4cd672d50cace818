"""The images of one trial: its data source opened once per process (`PoolCache`), and the training
subset, held-out set and FID reference gathered from it by index (`load_subsets`): from a prepared pack
only the shards holding those images are read, never the whole pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from trainer import data as datalib
from trainer.builtins import held_out_region
from trainer.config import TrialConfig
from trainer.subsets import pool_sample, split_subsets


@dataclass
class Subsets:
    """The training subset and the held-out set, as uint8 (N, C, H, W) tensors on the device, with
    their int64 (N,) class labels when the model is class-conditional (else None), and the FID
    reference images (uint8 on the CPU) when FID is enabled. `train_ids` and `test_ids` name each image
    by its index in the data source (the evaluation noise follows them); None means 0..n-1 (tests,
    benchmarks)."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    fid_reference: torch.Tensor | None = None
    train_ids: list[int] | None = None
    test_ids: list[int] | None = None

    @property
    def channels(self) -> int:
        return self.train.shape[1]


class PoolCache:
    """The opened data source of the last trial, kept for the next trial in the same process.

    A Ray worker runs trial after trial (Tune reuses its actors), and trials of a sweep mostly differ in
    the subset they draw from one source. A prepared pack or a .npy is opened memory-mapped (cheap:
    each trial then reads only the shards or rows of its own subset and held-out set); an image folder,
    a .npz, Parquet or LMDB source is decoded when opened, which then happens once per worker instead of
    once per trial. The key holds the source's fingerprint (size and modification times of local files),
    so edited data is read again. One entry: a sweep over several sources alternates between them at
    worst, and a decoded source can be large.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._source: datalib.ImageSource | None = None
        self._lock = threading.Lock()  # Tune runs a trainable in a thread of its worker
        self.hits = self.misses = 0

    def get(self, config: TrialConfig) -> datalib.ImageSource:
        with self._lock:
            return self._get(config)

    def _get(self, config: TrialConfig) -> datalib.ImageSource:
        before = self._key_of(config)
        if self._source is not None and self._key == before:
            self.hits += 1
            return self._source
        self._key = self._source = None  # drop the old source before opening the new one
        source = datalib.open_source(config.data.source, config.data.image_size)
        self.misses += 1
        after = self._key_of(config)
        # The first load of a remote source makes the local copy that its key names. A local source
        # edited while it was being read gets no key, so the next trial reads it again.
        if before == after or before[-1][0] == "remote":
            self._key, self._source = after, source
        return source

    @staticmethod
    def _key_of(config: TrialConfig) -> tuple:
        data = config.data
        return (data.source, data.image_size, datalib.source_fingerprint(data.source))

    def clear(self) -> None:
        with self._lock:
            self._key = self._source = None


POOLS = PoolCache()


def load_subsets(config: TrialConfig, device: torch.device) -> Subsets:
    """The trial's training subset, held-out set and FID reference, gathered from the source by index:
    from a prepared pack only the shards that hold them are read, never the whole pool."""
    source = POOLS.get(config)
    _check_has_labels(config, source)
    region = held_out_region(config.data.source, config.data.image_size)
    train_idx, test_idx = split_subsets(
        source.count,
        config.data.test_images,
        config.data.num_images,
        config.data.fraction,
        config.data.shuffle_seed,
        disjoint=config.data.disjoint,
        region=region,
    )
    # One uint8 tensor on the device: batches are gathered by index, so the data path never stalls.
    fid = config.eval.fid
    reference_idx = pool_sample(source.count, config.data.test_images, fid.samples, region=region) if fid.enabled else None
    train_labels, test_labels = (class_labels(config, source, idx) for idx in (train_idx, test_idx))
    return Subsets(
        train=_channels_first(source.gather(train_idx)).to(device),
        test=_channels_first(source.gather(test_idx)).to(device),
        train_labels=None if train_labels is None else train_labels.to(device),
        test_labels=None if test_labels is None else test_labels.to(device),
        fid_reference=None if reference_idx is None else _channels_first(source.gather(reference_idx)),
        train_ids=[int(i) for i in train_idx],
        test_ids=[int(i) for i in test_idx],
    )


def _channels_first(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, C, H, W), contiguous."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def class_labels(config: TrialConfig, source: datalib.ImageSource, indices: np.ndarray) -> torch.Tensor | None:
    """The (n,) int64 labels of the images at `indices` when model.num_classes > 0, checked against it;
    else None."""
    num_classes, name = config.model.num_classes, config.data.source
    if num_classes == 0:
        return None
    labels = source.labels(indices)
    if len(labels) and labels.max() >= num_classes:
        raise datalib.DataError(
            f"data source {name!r} has labels up to {labels.max()} but model.num_classes={num_classes}; "
            f"set model.num_classes to at least {labels.max() + 1}"
        )
    return torch.from_numpy(labels)


def _check_has_labels(config: TrialConfig, source: datalib.ImageSource) -> None:
    num_classes, name = config.model.num_classes, config.data.source
    if num_classes and source.has_labels:
        source.check_label_count()
    if num_classes and not source.has_labels:
        raise datalib.DataError(
            f"model.num_classes={num_classes} needs labels, but data source {name!r} has none; use a source "
            f"with labels (digits, a .npz with a 'labels' array, class folders, a prepared pack with labels) "
            f"or set model.num_classes=0"
        )
