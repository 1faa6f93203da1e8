"""lit_open/glue.py: every function that touches a Lightning, litdata or lm-eval internal, exercised against the
installed versions. When a library changes an internal, these fail with the message the user would see, which names
the library, its version and the internal."""

from __future__ import annotations

import multiprocessing
import os
import signal
from importlib.metadata import version

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_open import glue


class CountingModule(L.LightningModule):
    """Manual optimization, as LitLM: counts batches and validations; after `rewind_at` updates the step counter
    goes back to 0 once (a rollback), and validation is asked for right after batch `validate_after`."""

    def __init__(self, rewind_at: int, validate_after: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)
        self.rewind_at, self.validate_after = rewind_at, validate_after
        self.batches, self.validated_after = 0, []

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.manual_backward(self.layer(batch).sum())
        optimizer.step()
        optimizer.zero_grad()
        self.batches += 1
        if self.global_step == self.rewind_at and self.rewind_at:
            glue.set_optimizer_step_count(self.trainer, 0)
            self.rewind_at = 0

    def on_train_batch_end(self, outputs, batch, batch_idx):
        glue.validate_after_this_batch(self.trainer, due=batch_idx == self.validate_after)

    def validation_step(self, batch, batch_idx):
        self.validated_after.append(self.batches)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quiet_trainer(root, max_steps: int, **options) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary."""
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
        **options,
    )


def test_the_step_counter_goes_back_and_validation_follows_the_batch_it_is_asked_for(tmp_path):
    module = CountingModule(rewind_at=2, validate_after=3)
    trainer = quiet_trainer(
        tmp_path, 3, val_check_interval=glue.NEVER, check_val_every_n_epoch=None, num_sanity_val_steps=0
    )
    data = DataLoader(torch.randn(64, 2), batch_size=1)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=DataLoader(torch.randn(1, 2), batch_size=1))
    assert module.batches == 5 and trainer.global_step == 3  # 2 updates, back to 0, then 3 more
    assert module.validated_after == [4]  # after the 4th batch (batch_idx 3) only


def test_the_csv_logger_keeps_the_rows_a_resumed_run_has(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss\n1,2.0\n2,1.5\n3,1.0\n")
    logger = glue.resuming_csv_logger(tmp_path, keep_through=2, name="logs", version="")
    logger.log_metrics({"train/loss": 0.5}, step=3)
    logger.save()
    assert (tmp_path / "logs" / "metrics.csv").read_text().splitlines() == [
        "step,train/loss",
        "1,2.0",
        "2,1.5",
        "3,0.5",
    ]


def test_litdata_optimize_is_sandboxed_and_restored(tmp_path):
    from litdata.processing.data_processor import DataProcessor

    before = (DataProcessor._signal_handler, multiprocessing.get_start_method(allow_none=True))
    sigint = signal.getsignal(signal.SIGINT)
    with glue.litdata_optimize_sandbox(tmp_path):
        assert DataProcessor._signal_handler is glue._interrupt_optimize
        assert os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] == str(tmp_path / "litdata-chunks")
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C during optimize: an exception, not os._exit(0)
            glue._interrupt_optimize(type("Processor", (), {"workers": []})(), signal.SIGINT, None)
    assert (DataProcessor._signal_handler, multiprocessing.get_start_method(allow_none=True)) == before
    assert signal.getsignal(signal.SIGINT) is sigint and "DATA_OPTIMIZER_CACHE_FOLDER" not in os.environ


def test_lm_eval_progress_bars_are_off_inside_only():
    import lm_eval.api.model
    import lm_eval.api.task

    original = lm_eval.api.task.tqdm
    with glue.lm_eval_progress_bars_off():
        for module in (lm_eval.api.task, lm_eval.api.model):
            assert module.tqdm(range(3), disable=False).disable
    assert lm_eval.api.task.tqdm is original


def test_lm_eval_reads_a_task_yaml(tmp_path):
    (tmp_path / "base.yaml").write_text("output_type: multiple_choice\n")
    (tmp_path / "task.yaml").write_text("include: base.yaml\ntask: mine\ndataset_path: json\n")
    config = glue.load_lm_eval_task_yaml(tmp_path / "task.yaml")
    assert config["task"] == "mine" and config["output_type"] == "multiple_choice"


@pytest.mark.parametrize(
    ("library", "owner", "attribute", "call"),
    [
        ("litdata", "litdata.processing.data_processor.DataProcessor", "_signal_handler", "sandbox"),
        ("lightning", "lightning.fabric.loggers.csv_logs._ExperimentWriter", "_check_log_dir_exists", "csv"),
        ("lm_eval", "lm_eval.tasks._yaml_loader", "load_yaml", "yaml"),
        ("lightning", "lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "total_batch_idx", "validate"),
    ],
)
def test_a_changed_internal_names_the_library_and_its_version(library, owner, attribute, call, monkeypatch, tmp_path):
    import importlib

    module_name, _, class_name = owner.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), class_name)
    except AttributeError:
        target = importlib.import_module(owner)
    monkeypatch.delattr(target, attribute)
    glue._resuming_csv_logger_class.cache_clear()
    calls = {
        "sandbox": lambda: glue.litdata_optimize_sandbox(tmp_path).__enter__(),
        "csv": lambda: glue.resuming_csv_logger(tmp_path, keep_through=None),
        "yaml": lambda: glue.load_lm_eval_task_yaml(tmp_path / "x.yaml"),
        "validate": lambda: glue.validate_after_this_batch(L.Trainer(logger=False, accelerator="cpu"), due=True),
    }
    with pytest.raises(glue.InternalChanged, match=rf"{attribute}.*{library} {version(library)}"):
        calls[call]()
    glue._resuming_csv_logger_class.cache_clear()


def test_litdata_token_chunks_are_read_in_place_as_streaming_dataset_reads_them(tmp_path):
    import json
    import pickle
    import shutil

    import numpy as np
    from litdata import StreamingDataset, TokensLoader, optimize

    documents = [np.arange(n, dtype=np.uint16) + 100 * k for k, n in enumerate([50, 7, 300, 64, 129, 33] * 3)]
    with glue.litdata_optimize_sandbox(tmp_path / "work"):
        optimize(
            fn=np.asarray,
            inputs=documents,
            output_dir=str(tmp_path / "data"),
            chunk_size=200,  # tokens: several chunks, each with its unread tail
            item_loader=TokensLoader(),
            num_workers=1,
            mode="overwrite",
            reorder_files=False,
            verbose=False,
        )
    for block in (9, 33):
        reader = glue.litdata_token_reader(tmp_path / "data", block)
        dataset = StreamingDataset(str(tmp_path / "data"), item_loader=TokensLoader(block_size=block))
        assert len(reader) == len(dataset) > 10
        for i in range(len(reader)):
            assert reader[i].dtype == dataset[i].dtype and np.array_equal(reader[i], dataset[i])
        with pytest.raises(IndexError):
            reader[len(reader)]
        clone = pickle.loads(pickle.dumps(reader))  # as a DataLoader worker gets it: it opens its own files
        assert np.array_equal(clone[len(clone) - 1], dataset[len(dataset) - 1])

    index = json.loads((tmp_path / "data" / "index.json").read_text())
    shutil.copytree(tmp_path / "data", tmp_path / "changed")
    index["chunks"][0]["chunk_size"] += 1  # a chunk header that no longer says what index.json says
    (tmp_path / "changed" / "index.json").write_text(json.dumps(index))
    with pytest.raises(glue.InternalChanged, match=rf"chunk layout.*litdata {version('litdata')}"):
        glue.litdata_token_reader(tmp_path / "changed", 9)[0]
    index["config"]["compression"] = "zstd"  # not plain token arrays: left to StreamingDataset
    (tmp_path / "changed" / "index.json").write_text(json.dumps(index))
    assert glue.litdata_token_reader(tmp_path / "changed", 9) is None


def test_the_checkpoint_dict_is_built_without_writing_and_the_sharded_strategies_are_known(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    module = CountingModule(rewind_at=0, validate_after=-1)
    trainer = quiet_trainer(tmp_path, 2)
    trainer.fit(module, train_dataloaders=DataLoader(torch.randn(8, 2), batch_size=1))
    checkpoint = glue.dump_checkpoint(trainer)
    assert checkpoint["global_step"] == 2 and not list(tmp_path.rglob("*.ckpt"))
    assert torch.equal(checkpoint["state_dict"]["layer.weight"], module.layer.weight)
    assert len(checkpoint["optimizer_states"]) == 1
    assert glue.saves_sharded(ModelParallelStrategy(save_distributed_checkpoint=True))
    assert not glue.saves_sharded(ModelParallelStrategy(save_distributed_checkpoint=False))
    assert not glue.saves_sharded(DDPStrategy())


def test_the_nccl_flight_record_dumps_on_demand():
    import pickle

    record = pickle.loads(glue.nccl_flight_record())  # no NCCL group here: the trace's envelope, no entries
    assert "version" in record and not record.get("entries")


class MeshModule(CountingModule):
    """Records the device mesh the strategy gives configure_model, and FSDP2's flattened view of it."""

    def configure_model(self) -> None:
        mesh = self.device_mesh
        self.mesh = (mesh.mesh_dim_names, tuple(mesh.shape))
        flat = glue.flattened_mesh(mesh, ("data_parallel", "context_parallel"), "data_context_parallel")
        self.flat = (flat.mesh_dim_names, flat.size())


def test_the_model_parallel_strategy_builds_the_three_dimensional_mesh(tmp_path):
    from lit_open.train.runner import release_process_group

    module = MeshModule(rewind_at=0, validate_after=-1)
    strategy = glue.model_parallel_strategy(1, 1, 1)
    try:
        quiet_trainer(tmp_path, 1, strategy=strategy, devices=1).fit(
            module, train_dataloaders=DataLoader(torch.randn(4, 2), batch_size=1)
        )
    finally:
        release_process_group()
    assert module.mesh == (glue.MESH_DIMS, (1, 1, 1)) and module.batches == 1
    assert module.flat == (("data_context_parallel",), 1)
    assert glue.saves_sharded(strategy)
