"""The 1:N search index: hnswlib's HNSW graph, the one module that imports hnswlib.

It holds decrypted templates in memory only (it is rebuilt from the encrypted store at
start) under integer labels, the `templates.label` column. Search returns the nearest
`k` candidates by the graph, re-ranked by their exact Euclidean distance to the probe in
float64. A deleted template is marked deleted in the graph (never returned again) and its
slot is reused by a later insertion; a re-enrolled template keeps its label and has its
vector replaced. One lock guards the graph: a search takes well under a millisecond, and
hnswlib's updates are not safe to run beside searches of the same element.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import hnswlib
import numpy as np

from services.face.domain import EMBEDDING_DIMENSIONS

CAPACITY_INITIAL = 1024


class TemplateIndex:
    """Labels to vectors, searchable by nearest neighbour."""

    def __init__(self, *, m: int = 16, ef_construction: int = 100, ef_search: int = 512,
                 dim: int = EMBEDDING_DIMENSIONS, capacity: int = CAPACITY_INITIAL, threads: int = 1) -> None:
        self._m = m
        self._ef_construction = ef_construction
        self.ef_search = ef_search
        self._dim = dim
        self._threads = threads
        self._lock = threading.RLock()
        self._live: set[int] = set()
        self._index = self._new(capacity)

    def _new(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="l2", dim=self._dim)
        index.init_index(max_elements=max(capacity, 16), M=self._m, ef_construction=self._ef_construction,
                         random_seed=100, allow_replace_deleted=True)
        index.set_ef(self.ef_search)
        index.set_num_threads(self._threads)
        return index

    def set_ef_search(self, ef_search: int) -> None:
        """Change the search breadth (the benchmark sweeps it on one built index)."""
        with self._lock:
            self.ef_search = ef_search
            self._index.set_ef(ef_search)

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, label: int) -> bool:
        return label in self._live

    def build(self, labels: Sequence[int], vectors: np.ndarray) -> None:
        """Replace the whole index with `vectors` under `labels` (start-up rebuild)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self._dim)
        if len(labels) != len(vectors):
            raise ValueError("one label per vector")
        index = self._new(max(CAPACITY_INITIAL, int(len(labels) * 1.25)))
        if len(labels):
            index.add_items(vectors, np.asarray(labels, dtype=np.uint64), num_threads=self._threads)
        with self._lock:
            self._index = index
            self._live = set(int(label) for label in labels)

    def upsert(self, label: int, vector: np.ndarray) -> None:
        """Add a template, or replace the vector of a label already present."""
        vector = np.asarray(vector, dtype=np.float32).reshape(1, self._dim)
        with self._lock:
            if label not in self._live:
                if self._index.get_current_count() >= self._index.get_max_elements() \
                        and len(self._live) >= self._index.get_current_count():
                    self._index.resize_index(self._index.get_max_elements() * 2)
                self._index.add_items(vector, np.asarray([label], dtype=np.uint64), replace_deleted=True)
            else:
                self._index.add_items(vector, np.asarray([label], dtype=np.uint64))
            self._live.add(label)

    def remove(self, label: int) -> bool:
        """Mark `label` deleted; False when it was not in the index."""
        with self._lock:
            if label not in self._live:
                return False
            self._index.mark_deleted(label)
            self._live.discard(label)
            return True

    def search(self, probe: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to `k` (label, exact distance) pairs, closest first."""
        probe = np.asarray(probe, dtype=np.float32).reshape(1, self._dim)
        with self._lock:
            k = min(k, len(self._live))
            if k == 0:
                return []
            labels, _ = self._index.knn_query(probe, k=k)
            found = labels[0].astype(np.int64)
            vectors = np.asarray(self._index.get_items(found), dtype=np.float64)
        distances = np.linalg.norm(vectors - probe.astype(np.float64), axis=1)
        order = np.argsort(distances, kind="stable")
        return [(int(found[i]), float(distances[i])) for i in order]
