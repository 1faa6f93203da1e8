"""release: when exports happen (steps, tokens, end) and its options; the exports themselves are tested end to end
in tests/e2e/test_finetune.py (transformers loads them; metadata, tokenizer, convert)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import bind_run

from lit_open.errors import UserError
from lit_open.model import ModelConfig
from lit_open.plugins.release import Release


def exported_steps(plugin: Release, steps: int, tokens_per_step: int) -> list[int]:
    exported = []
    plugin.export = lambda trainer, module: (
        exported.append(trainer.global_step) or setattr(plugin, "_exported_step", trainer.global_step)
    )
    trainer = SimpleNamespace(global_step=0)
    model = SimpleNamespace(config=ModelConfig(n_layer=1, d_model=32, n_head=2, d_ff=64, vocab_size=64))
    module = SimpleNamespace(model=model)
    run = bind_run(plugin, tokens_per_batch=tokens_per_step)
    plugin.on_train_start(trainer, module)
    for step in range(1, steps + 1):  # LitLM ends each applied update with on_step_end
        trainer.global_step = run.consumed_batches = step
        plugin.on_step_end(trainer, module, step)
    plugin.on_train_end(trainer, module)
    return exported


def test_exports_every_n_steps_and_at_the_end():
    assert exported_steps(Release(every_n_steps=4), steps=10, tokens_per_step=100) == [4, 8, 10]
    assert exported_steps(Release(every_n_steps=5, at_end=False), steps=10, tokens_per_step=100) == [5, 10]


def test_exports_each_time_the_tokens_cross_a_multiple():
    # 300 tokens per step: 1000 is crossed at step 4 (1200), 2000 at step 7 (2100), 3000 at step 10 (3000)
    plugin = Release(every_n_steps=0, every_n_tokens=1000, at_end=False)
    assert exported_steps(plugin, steps=10, tokens_per_step=300) == [4, 7, 10]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every_n_steps": -1}, "every_n_steps=-1"),
        ({"every_n_steps": 0, "at_end": False}, "exports nothing"),
        ({"dtype": "int8"}, "dtype='int8'"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(UserError, match=message):
        Release(**options)


def test_a_model_no_hugging_face_layout_describes_is_refused_before_training():
    model = SimpleNamespace(config=ModelConfig(n_layer=1, d_model=32, n_head=2, d_ff=64, vocab_size=64, qk_norm="head"))
    with pytest.raises(UserError, match="plugins.release cannot export this model"):
        Release().on_train_start(SimpleNamespace(global_step=0), SimpleNamespace(model=model))
