"""Graphs for node classification: ``load_graph(name, data_dir, seed, **options)``.

* ``karate``: Zachary's karate club (networkx ships it): 34 members, 78 friendships, the two
  clubs after the split as labels, one-hot node ids as features (as Kipf & Welling do).
* ``knn-digits`` / ``knn-fashion-mnist``: k-nearest-neighbour graphs over real images (option
  ``k``, default 10; ``nodes``, default 1797 / 3000 for Fashion-MNIST, the first images of its
  training file), pixels as features: the classic semi-supervised benchmark of label spreading.
* ``planetoid``: the ``ind.NAME.{x,y,tx,ty,allx,ally,graph,test.index}`` files of Yang et al.
  2016 (Cora, CiteSeer, PubMed, or a user's graph in that format; option ``name``), read with a
  restricted unpickler (numpy arrays, scipy sparse matrices and dicts only: a doctored file
  cannot run code) and assembled by PyTorch Geometric's reader.

Splits (option ``split``): ``random`` (default) draws ``train``/``val`` fractions (default 0.6 /
0.2, the rest is test) from the seed ``split_seed`` (default: the run's seed), so seeds 0..9 are
the paper's 10 random splits; ``public`` is the split the Planetoid files define (20 labels per
class, 500 validation, 1000 test nodes); ``per-class`` draws that kind of split (``per_class``
labels per class, then 500 / 1000) for any graph.
"""

from __future__ import annotations

import importlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import DataError
from ..registry import Registry

GRAPHS: Registry = Registry("graph data set")
SPLITS = ("random", "public", "per-class")
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


@dataclass
class NodeSplit:
    """The nodes of one mask (its length is what a run reports as samples)."""

    mask: torch.Tensor

    def __len__(self):
        return int(self.mask.sum())


@dataclass
class GraphData:
    """One graph (a PyG ``Data`` with x, edge_index, y and the three masks) and its metadata."""

    name: str
    graph: object
    num_classes: int
    description: str = ""
    task: str = "node-classification"
    _propagation: dict = field(default_factory=dict, repr=False)

    @property
    def input_shape(self):
        return (self.graph.num_node_features,)

    @property
    def train(self):
        return NodeSplit(self.graph.train_mask)

    @property
    def test(self):
        return NodeSplit(self.graph.test_mask)

    @property
    def val(self):
        return NodeSplit(self.graph.val_mask)

    def loaders(self):
        """(train batches, evaluation batches): the whole graph, once per epoch."""
        return [self.graph], [self.graph]

    def propagation(self, device, dtype=torch.float32):
        """S = D^-1/2 (A + I) D^-1/2 of the graph (sparse), cached per device and dtype."""
        from .ops import propagation

        key = (str(device), dtype)
        if key not in self._propagation:
            g = self.graph
            self._propagation[key] = propagation(g.edge_index, g.num_nodes, dtype=dtype).to(device)
        return self._propagation[key]


def available_graphs() -> list[str]:
    return sorted(GRAPHS)


def is_graph(name: str) -> bool:
    return name in GRAPHS


def load_graph(dataset: str, data_dir=None, /, *, seed: int = 0, split: str = "random",
               train: float = 0.6, val: float = 0.2, per_class: int = 20,
               split_seed: int | None = None, drop_edges: float = 0.0, add_edges: float = 0.0,
               **options) -> GraphData:
    """Load graph ``dataset`` (see the module docstring) with the masks of ``split``;
    ``options`` go to its loader (``k``, ``nodes``, the Planetoid ``name``).

    Raises:
        ValueError / DataError: an unknown name or option, or missing or malformed files.
    """
    loader, name = GRAPHS.lookup(dataset), dataset
    if split not in SPLITS:
        raise ValueError(f"dataset option split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not (0 < train < 1 and 0 <= val < 1 and train + val < 1):
        raise ValueError(f"dataset options train and val must be fractions with train + val < 1; "
                         f"got train={train}, val={val}")
    try:
        graph, num_classes, description, public = loader(data_dir, **options)
    except TypeError as error:
        raise ValueError(f"data set {name!r}: bad dataset option ({error})") from None
    generator = torch.Generator().manual_seed(seed if split_seed is None else split_seed)
    if split == "public":
        if public is None:
            raise ValueError(f"data set {name!r} defines no split of its own: use split=random "
                             "or split=per-class")
        masks = public
    elif split == "per-class":
        masks = _per_class_split(graph.y, num_classes, per_class, generator)
    else:
        masks = _random_split(graph.num_nodes, train, val, generator)
    graph.train_mask, graph.val_mask, graph.test_mask = masks
    if drop_edges or add_edges:  # the random structural attack of Zhao et al.'s robustness test
        graph.edge_index = _perturb(graph.edge_index, graph.num_nodes, drop_edges, add_edges,
                                    generator)
        description += f", {drop_edges:.0%} of the edges removed, {add_edges:.0%} added"
    return GraphData(name, graph, num_classes, description)


def _perturb(edge_index, n, drop, add, generator):
    """Remove a fraction ``drop`` of the (undirected) edges and add ``add`` x |E| random ones."""
    from torch_geometric.utils import to_undirected

    if not (0 <= drop <= 1 and add >= 0):
        raise ValueError(f"dataset options drop_edges must be in [0, 1] and add_edges >= 0; got "
                         f"{drop}, {add}")
    pairs = edge_index[:, edge_index[0] < edge_index[1]]
    keep = torch.rand(pairs.shape[1], generator=generator) >= drop
    extra = torch.randint(0, n, (2, round(add * pairs.shape[1])), generator=generator)
    extra = extra[:, extra[0] != extra[1]]
    return to_undirected(torch.cat([pairs[:, keep], extra], 1), num_nodes=n)


def _random_split(n, train, val, generator):
    order = torch.randperm(n, generator=generator)
    n_train, n_val = round(train * n), round(val * n)
    return tuple(_mask(n, part) for part in (order[:n_train], order[n_train:n_train + n_val],
                                             order[n_train + n_val:]))


def _per_class_split(labels, num_classes, per_class, generator, val=500, test=1000):
    n = len(labels)
    order = torch.randperm(n, generator=generator)
    chosen = torch.cat([order[labels[order] == c][:per_class] for c in range(num_classes)])
    rest = order[~_mask(n, chosen)[order]]
    val = min(val, len(rest) // 3)
    return _mask(n, chosen), _mask(n, rest[:val]), _mask(n, rest[val:val + test])


def _mask(n, index):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return mask


def _data(x, edge_index, y):
    from torch_geometric.data import Data
    from torch_geometric.utils import to_undirected

    return Data(x=x.float(), edge_index=to_undirected(edge_index, num_nodes=len(y)), y=y.long())


@GRAPHS.register("karate")
def _karate(data_dir):
    """Zachary's karate club from networkx (34 nodes, 78 edges, 2 clubs)."""
    import networkx as nx

    _no_files("karate", data_dir)
    g = nx.karate_club_graph()
    edges = torch.tensor(list(g.edges), dtype=torch.long).t()
    y = torch.tensor([g.nodes[i]["club"] != "Mr. Hi" for i in g.nodes], dtype=torch.long)
    return _data(torch.eye(g.number_of_nodes()), edges, y), 2, "Zachary's karate club", None


def _knn(features: np.ndarray, labels: np.ndarray, k: int):
    from sklearn.neighbors import kneighbors_graph

    if not isinstance(k, int) or not 1 <= k < len(labels):
        raise ValueError(
            f"dataset option k must be an integer in [1, {len(labels) - 1}]; got {k!r}"
        )
    adjacency = kneighbors_graph(features, k, mode="connectivity").tocoo()
    edges = torch.from_numpy(np.stack([adjacency.row, adjacency.col]).astype(np.int64))
    return _data(torch.from_numpy(features), edges, torch.from_numpy(labels.astype(np.int64)))


@GRAPHS.register("knn-digits")
def _knn_digits(data_dir, k: int = 10, nodes: int | None = None):
    """scikit-learn's 1797 digits, each joined to its k nearest neighbours (pixels / 16)."""
    from sklearn.datasets import load_digits

    _no_files("knn-digits", data_dir)
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    x, y = x[:nodes], y[:nodes]
    return _knn(x, y, k), 10, f"{len(y)} digits, {k}-NN graph", None


@GRAPHS.register("knn-fashion-mnist")
def _knn_fashion(data_dir, k: int = 10, nodes: int = 3000):
    """The first N Fashion-MNIST training images (option nodes), joined to k nearest neighbours."""
    from ..data import dataset_dir, idx, missing_message

    directory = dataset_dir("fashion-mnist", data_dir)
    if not all(idx.find(directory, n) for n in idx.file_names("train")):
        raise DataError(missing_message("fashion-mnist", data_dir))
    split = idx.load_split(directory, "train", 10, (28, 28))
    x = split.images[:nodes].flatten(1).numpy().astype(np.float32) / 255.0
    y = split.labels[:nodes].numpy()
    return _knn(x, y, k), 10, f"{len(y)} Fashion-MNIST images, {k}-NN graph", None


def _no_files(name, data_dir):
    if data_dir is not None:
        raise ValueError(f"data set {name!r} reads no files, so --data-dir {data_dir} would be "
                         "ignored: leave it out")


_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("collections", "defaultdict"), ("builtins", "list"),
    ("scipy.sparse.csr", "csr_matrix"), ("scipy.sparse._csr", "csr_matrix"),
    ("scipy.sparse.csc", "csc_matrix"), ("scipy.sparse._csc", "csc_matrix"),
    ("scipy.sparse._arrays", "csr_array"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Admits what the Planetoid files hold: numpy arrays, scipy sparse matrices, dicts."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core"):  # written by numpy 1.x; numpy 2 moved it
            module = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)


@GRAPHS.register("planetoid")
def _planetoid(data_dir, name: str = "Cora"):
    """The Planetoid files ind.NAME.* in --data-dir (Cora, CiteSeer, PubMed, or yours).

    As Yang et al.'s loader does: the nodes are allx then tx, the test rows are put in the order
    of test.index; the public split is x's rows for training, the next 500 for validation and
    test.index for test; test indices missing from tx (CiteSeer's isolated nodes) get zero rows.
    """
    from torch_geometric.io.planetoid import edge_index_from_dict

    if data_dir is None:
        raise DataError(
            "data set 'planetoid' needs --data-dir DIR holding ind.NAME.x, .y, .tx, .ty, .allx, "
            ".ally, .graph and .test.index (e.g. from github.com/kimiyoung/planetoid, data/), "
            "and --set dataset_options.name=NAME (default Cora)"
        )
    directory, prefix = Path(data_dir).expanduser(), name.lower()
    parts = {part: _read_planetoid(directory / f"ind.{prefix}.{part}") for part in PLANETOID_FILES}
    try:
        x, tx, allx = (_dense(parts[p], torch.float32) for p in ("x", "tx", "allx"))
        y, ty, ally = (_dense(parts[p], torch.long) for p in ("y", "ty", "ally"))
        test_index = parts["test.index"]
        ordered = test_index.sort().values
        span = int(ordered[-1] - ordered[0]) + 1
        if span > len(tx):  # isolated test nodes (CiteSeer): zero rows where they are missing
            tx_full, ty_full = tx.new_zeros(span, tx.shape[1]), ty.new_zeros(span, ty.shape[1])
            tx_full[ordered - ordered[0]], ty_full[ordered - ordered[0]] = tx, ty
            tx, ty = tx_full, ty_full
        features, onehot = torch.cat([allx, tx]), torch.cat([ally, ty])
        features[test_index] = features[ordered].clone()
        onehot[test_index] = onehot[ordered].clone()
        n = len(features)
        edges = edge_index_from_dict(parts["graph"], num_nodes=n)
        labels = onehot.argmax(1)
        train = torch.arange(len(y))
        public = (_mask(n, train), _mask(n, torch.arange(len(y), min(len(y) + 500, len(ally)))),
                  _mask(n, test_index))
    except (IndexError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"{directory}: the ind.{prefix}.* files do not form a Planetoid data set "
                        f"({type(error).__name__}: {error})") from None
    return _data(features, edges, labels), onehot.shape[1], f"Planetoid {name}", public


def _read_planetoid(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found (a Planetoid data set needs "
                        f"ind.NAME.{{{','.join(PLANETOID_FILES)}}})")
    if path.name.endswith("test.index"):
        try:
            return torch.tensor([int(line) for line in path.read_text().split()])
        except ValueError:
            raise DataError(f"{path}: not a list of node indices") from None
    try:
        return _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as error:  # any failure to parse means a malformed file
        raise DataError(f"{path}: not a Planetoid file ({type(error).__name__}: {error})") \
            from None


def _dense(obj, dtype):
    obj = obj.todense() if hasattr(obj, "todense") else obj
    return torch.from_numpy(np.asarray(obj)).to(dtype)
