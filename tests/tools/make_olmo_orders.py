"""Golden file of OLMo's data order, made by the publishers' own code: writes tests/data/olmo_orders.npz.

Nothing here re-derives the shuffle: every array comes out of a publisher object built over a small fake corpus
of N instances, through the same methods their trainers call.

Rerun (from the repository root; lit-open's own venv stays untouched, the packages go to /tmp/olmo_pkgs):

    .venv/bin/python -m pip install --no-deps --target /tmp/olmo_pkgs \
        ai2-olmo==0.6.0 ai2-olmo-core==3.0.0 cached-path==1.8.10 dataclass-extensions==0.5.0 bettermap==1.3.1 \
        importlib_resources==7.1.0 google-cloud-storage==3.17.1 google-api-core==2.44.0 google-auth==2.63.0 \
        google-cloud-core==2.8.0 google-resumable-media==2.11.0 google-crc32c==1.9.0 \
        googleapis-common-protos==1.76.0 proto-plus==1.29.0 cachetools==8.0.2 pyasn1==0.6.5 \
        pyasn1-modules==0.4.2 rsa==4.9.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
    PYTHONPATH=/tmp/olmo_pkgs .venv/bin/python tests/tools/make_olmo_orders.py

(The google-*/cryptography packages are only there because `cached_path`, imported by both publishers' config
modules, imports its gs:// scheme at import time; nothing is stubbed.)  Made with ai2-olmo 0.6.0 and
ai2-olmo-core 3.0.0 under torch 2.14.1 and numpy 2.4.6 (ai2-olmo asks for numpy<2 and ai2-olmo-core for
torch<2.14; the data modules import and run regardless, and the arrays equal those from numpy 1.26.4).

Publisher code called (line numbers in the installed wheels; the script checks them with `inspect`):

- old OLMo trainer, ai2-olmo 0.6.0 (`olmo/data/__init__.py#L111-L122` builds it this way for training):
  `olmo.data.iterable_dataset.IterableDataset` -- `__init__` (olmo/data/iterable_dataset.py:27, drop_last
  total_size at :56-64), `get_global_indices` (:115), which calls `_build_global_indices` (:90-113; the PCG64
  shuffle at :96-97, drop_last truncation at :111), `reshuffle` (:121) to move to epoch 1, and `__iter__`
  (:126; rank slicing at :140) for one rank's order.
- OLMo-core, ai2-olmo-core 3.0.0 (its Trainer calls `data_loader.reshuffle(self.epoch)` with `epoch` starting at 1,
  olmo_core/train/trainer.py:255, :1681): `olmo_core.data.data_loader.NumpyFSLDataLoader` over a real
  `olmo_core.data.numpy_dataset.NumpyFSLDataset` -- `NumpyDataLoaderBase.reshuffle` (olmo_core/data/data_loader.py:535;
  epoch defaults to 1, then +1, and must be >= 1 at :537-541), `build_and_save_global_indices` (:510),
  `get_global_indices` (:503), `NumpyFSLDataLoader._build_global_indices` (:667-690; `get_rng(seed + epoch)` at
  :673, from olmo_core/data/utils.py:505-506), `NumpyFSLDataLoader.total_size` (:641-648) and
  `NumpyFSLDataLoader._get_local_instance_indices` (:720) for one rank's order.

Arrays (all uint32; `cases` is a JSON string per case with its parameters and array names):

- `olmo_seed6198_epoch{0,1}_n10007_ws4_droplast`: IterableDataset's global indices (10004 = N - N % 4 long).
- `olmo_seed6198_epoch0_n10007_ws4_nodroplast`: the same with drop_last=False (OLMo's config default): 10008 long,
  padded with the shuffle's own first index.
- `olmocore_seed6198_epoch{1,2}_n10007`: NumpyFSLDataLoader's global indices: all N, never truncated here; the
  loader cuts them to `total_size` (a multiple of the global batch in instances, not of the world size) later.
- `*_rank1`: the instance order that DP rank 1 of 4 reads (old OLMo: `__iter__`; OLMo-core:
  `_get_local_instance_indices` with a global batch of 8 instances, 2 per rank).
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

N = 10007
SEED = 6198
WORLD_SIZE = 4
RANK = 1
OUT = Path(__file__).resolve().parents[1] / "data" / "olmo_orders.npz"


def check_line(obj, path_suffix: str, line: int) -> None:
    """Fail if a publisher function moved, so the docstring's file:line stays true for the versions named there."""
    fn = inspect.unwrap(obj.fget if isinstance(obj, property) else obj)
    got_file = inspect.getsourcefile(fn)
    got_line = inspect.getsourcelines(fn)[1]
    assert got_file.endswith(path_suffix), (got_file, path_suffix)
    # getsourcelines points at the first decorator for a decorated function
    assert got_line in (line, line - 1, line - 2), (fn.__qualname__, got_line, line)


class FakeSequence:
    """Stand-in corpus for old OLMo's IterableDataset: any sequence works; item i is just [i]."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return [int(i)]


def old_olmo(cases: list, arrays: dict) -> None:
    from olmo.data.iterable_dataset import IterableDataset

    check_line(IterableDataset.__init__, "olmo/data/iterable_dataset.py", 27)
    check_line(IterableDataset._build_global_indices, "olmo/data/iterable_dataset.py", 90)
    check_line(IterableDataset.get_global_indices, "olmo/data/iterable_dataset.py", 115)
    check_line(IterableDataset.reshuffle, "olmo/data/iterable_dataset.py", 121)
    check_line(IterableDataset.__iter__, "olmo/data/iterable_dataset.py", 126)

    def make(drop_last: bool, rank: int = 0) -> IterableDataset:
        return IterableDataset(
            FakeSequence(N),
            2 * WORLD_SIZE,  # global_batch_size in instances: 2 per rank
            seed=SEED,
            epoch=0,
            shuffle=True,
            drop_last=drop_last,
            world_size=WORLD_SIZE,
            rank=rank,
            fs_local_rank=0,
            work_dir=None,
            num_threads=0,
        )

    for drop_last in (True, False):
        epochs = (0, 1) if drop_last else (0,)
        ds = make(drop_last)
        ds_rank = make(drop_last, RANK)
        for epoch in epochs:
            if epoch != ds.epoch:
                ds.reshuffle(epoch)  # what olmo/train.py does at the end of an epoch
                ds_rank.reshuffle(epoch)
            g = np.array(ds.get_global_indices())
            assert g.dtype == np.uint32
            local = np.array([item["index"] for item in ds_rank], dtype=np.uint32)
            name = f"olmo_seed{SEED}_epoch{epoch}_n{N}_ws{WORLD_SIZE}_{'droplast' if drop_last else 'nodroplast'}"
            arrays[name] = g
            arrays[f"{name}_rank{RANK}"] = local
            cases.append(
                json.dumps(
                    dict(
                        name=name,
                        rank_array=f"{name}_rank{RANK}",
                        publisher="ai2-olmo",
                        version=md.version("ai2-olmo"),
                        code="olmo.data.iterable_dataset.IterableDataset.get_global_indices -> _build_global_indices",
                        n=N,
                        seed=SEED,
                        epoch=epoch,
                        world_size=WORLD_SIZE,
                        rank=RANK,
                        drop_last=drop_last,
                        total_size=int(ds.total_size),
                        length=int(len(g)),
                        global_batch_instances=ds.device_batch_size * WORLD_SIZE,
                    )
                )
            )


def olmo_core(cases: list, arrays: dict, tmp: Path) -> None:
    from olmo_core.data.collator import DataCollator
    from olmo_core.data.data_loader import NumpyDataLoaderBase, NumpyFSLDataLoader
    from olmo_core.data.numpy_dataset import NumpyFSLDataset
    from olmo_core.data.utils import get_rng

    dl = "olmo_core/data/data_loader.py"
    check_line(NumpyDataLoaderBase.reshuffle, dl, 535)
    check_line(NumpyDataLoaderBase.build_and_save_global_indices, dl, 510)
    check_line(NumpyDataLoaderBase.get_global_indices, dl, 503)
    check_line(NumpyFSLDataLoader._build_global_indices, dl, 667)
    check_line(NumpyFSLDataLoader.total_size, dl, 642)
    check_line(NumpyFSLDataLoader._get_local_instance_indices, dl, 720)
    check_line(get_rng, "olmo_core/data/utils.py", 505)

    seq_len = 4
    global_batch_instances = 2 * WORLD_SIZE
    tokens = tmp / "tokens.npy"
    # a flat token array as OLMo writes them (raw uint16, no .npy header); N * seq_len tokens -> exactly N instances
    np.memmap(tokens, dtype=np.uint16, mode="w+", shape=(N * seq_len,))[:] = np.arange(N * seq_len) % 1000

    def make(rank: int) -> NumpyFSLDataLoader:
        ds = NumpyFSLDataset(tokens, sequence_length=seq_len, pad_token_id=1, eos_token_id=0, vocab_size=1000)
        ds.work_dir = tmp / f"dataset_rank{rank}"
        ds.prepare()
        assert len(ds) == N
        return NumpyFSLDataLoader(
            ds,
            collator=DataCollator(pad_token_id=1),
            global_batch_size=global_batch_instances * seq_len,  # in tokens
            work_dir=tmp / f"loader_rank{rank}",
            seed=SEED,
            shuffle=True,
            dp_world_size=WORLD_SIZE,
            dp_rank=rank,
            fs_local_rank=0,
        )

    loader, loader_rank = make(0), make(RANK)
    for expected_epoch in (1, 2):
        loader.reshuffle()  # epoch=None: 1 on the first call, then epoch + 1 (data_loader.py:537-538)
        loader_rank.reshuffle()
        assert loader.epoch == expected_epoch
        g = np.array(loader.get_global_indices())  # read back from the uint32 memmap the loader wrote
        assert g.dtype == np.uint32
        local = np.asarray(loader_rank._get_local_instance_indices(loader_rank.get_global_indices()), dtype=np.uint32)
        name = f"olmocore_seed{SEED}_epoch{expected_epoch}_n{N}"
        arrays[name] = g
        arrays[f"{name}_rank{RANK}"] = local
        cases.append(
            json.dumps(
                dict(
                    name=name,
                    rank_array=f"{name}_rank{RANK}",
                    publisher="ai2-olmo-core",
                    version=md.version("ai2-olmo-core"),
                    code="olmo_core.data.data_loader.NumpyFSLDataLoader.reshuffle -> _build_global_indices",
                    n=N,
                    seed=SEED,
                    epoch=expected_epoch,
                    world_size=WORLD_SIZE,
                    rank=RANK,
                    chunk_size=loader.chunk_size,
                    total_size=int(loader.total_size),
                    length=int(len(g)),
                    global_batch_instances=global_batch_instances,
                )
            )
        )


def main() -> None:
    for pkg in ("ai2-olmo", "ai2-olmo-core"):
        print(pkg, md.version(pkg), file=sys.stderr)
    cases: list = []
    arrays: dict = {}
    old_olmo(cases, arrays)
    with tempfile.TemporaryDirectory() as tmp:
        olmo_core(cases, arrays, Path(tmp))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, cases=np.array(cases), **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size:,d} bytes): {', '.join(arrays)}", file=sys.stderr)


if __name__ == "__main__":
    main()
