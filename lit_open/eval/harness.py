"""lm-eval on the in-memory model: a `TemplateLM` adapter over a `Transformer`, task loading, one `run_tasks`.

The adapter tokenizes as the training data was (the run's `tokenizers` tokenizer, no BOS; documents end with EOS,
so EOS is the prefix of an empty context) and scores with the model as it is, sharded (FSDP2 / tensor parallel
through a device mesh) or not. Under a device mesh every process takes part: requests are split by data-parallel
rank (tensor-parallel peers score the same requests together), and every process runs the same number of forward
passes (the ones with less work run dummy passes), since each pass of a sharded model is a collective.
"""

from __future__ import annotations

import difflib
import numbers
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from lit_open.config import DEFAULT_MAX_GEN_TOKENS
from lit_open.errors import UserError
from lit_open.generate import generate
from lit_open.glue import lm_eval_progress_bars_off, load_lm_eval_task_yaml
from lit_open.model import Transformer


class _LockstepForward(nn.Module):
    """The model's forward with the sequence padded (on the right: attention is causal, so the real positions do
    not see it) to a multiple of `width_multiple` (sequence parallelism splits the sequence) and logits sliced to
    the vocabulary (the embeddings are padded).

    With `lockstep`, all processes pass in rounds: before each pass they agree (one small all-reduce) whether any
    still has work, and `finish()` runs idle passes on a process that is done until none has. Every process then
    issues the same collectives in the same order, however many passes its own requests need (rolling windows and
    generated lengths differ per document).
    """

    def __init__(self, model: Transformer, width_multiple: int, lockstep: bool) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.width_multiple = width_multiple
        self.lockstep = lockstep
        self.idle_passes = 0  # passes run only to keep step with busier processes

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.lockstep:
            self._anyone_busy(True)
        return self._logits(input_ids)

    def finish(self) -> None:
        """Keep passing (idle) until every process has run out of work; a no-op without lockstep."""
        if not self.lockstep:
            return
        device = next(self.model.parameters()).device
        while self._anyone_busy(False):
            self._logits(torch.zeros(1, 1, dtype=torch.long, device=device))
            self.idle_passes += 1

    def _anyone_busy(self, busy: bool) -> bool:
        flag = torch.tensor([int(busy)], device=next(self.model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        width = input_ids.size(1)
        padded = -(-width // self.width_multiple) * self.width_multiple
        if padded != width:
            input_ids = F.pad(input_ids, (0, padded - width))
        logits = self.model(input_ids)
        if hasattr(logits, "full_tensor"):  # a DTensor output of a tensor-parallel head
            logits = logits.full_tensor()
        return logits[:, :width, : self.config.vocab_size]


class LitOpenLM(TemplateLM):
    """lm-eval's view of a lit-open `Transformer` with its `tokenizers.Tokenizer`.

    eos_id: the token that ends each training document (also the context of an empty-context request).
    data_parallel: the data-parallel process group (None: the default group, or no distribution at all); requests
    are split by rank in it. tensor_parallel_size: the width of the tensor-parallel dimension (inputs are padded to
    a multiple of it).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        eos_id: int,
        *,
        batch_size: int = 8,
        max_gen_tokens: int = DEFAULT_MAX_GEN_TOKENS,
        data_parallel: dist.ProcessGroup | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.batch_size = batch_size
        self.max_gen_tokens = max_gen_tokens
        self.max_length = model.config.max_seq_len
        self._distributed = dist.is_available() and dist.is_initialized()
        self._forward = _LockstepForward(
            model, tensor_parallel_size, lockstep=self._distributed and dist.get_world_size() > 1
        )
        self._group = data_parallel
        self._rank = dist.get_rank(data_parallel) if self._distributed else 0
        self._world_size = dist.get_world_size(data_parallel) if self._distributed else 1
        self._device = next(model.parameters()).device

    # -- tokens ------------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    @property
    def tokenizer_name(self) -> str:
        return "lit-open"

    # -- scoring -----------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        with self._scoring():
            return self._score(requests)

    def _score(self, requests: list[tuple[Any, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        # the model sees at most max_length tokens: the context is cut on the left, the last token only predicts
        inputs = [(context + continuation)[-(self.max_length + 1) :][:-1] for _, context, continuation in requests]
        # longest first, so each batch pads little and the first one shows at once if memory runs out
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(inputs[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.eos_id, dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
            logprobs = F.log_softmax(self._forward(input_ids.to(self._device)).float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                continuation = requests[i][2]
                end = len(inputs[i])
                scored = logprobs[row, end - len(continuation) : end]
                target = torch.tensor(continuation)
                loglikelihood = float(scored.gather(-1, target[:, None]).sum())
                results[i] = (loglikelihood, bool((scored.argmax(-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole documents, in windows of the model's context (lm-eval's rolling windows)."""
        windows, owner = [], []
        for doc, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(doc)
        totals = [0.0] * len(requests)
        with self._scoring():
            for doc, (loglikelihood, _) in zip(owner, self._score(windows)):
                totals[doc] += loglikelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, cut at the first `until` string."""
        outputs: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings run in batches together
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        with self._scoring():
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1])
                until = kwargs.pop("until", None) or [self.tok_decode([self.eos_id])]
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", self.max_gen_tokens))
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                # a generator seeded alike on every process: tensor-parallel peers draw the same tokens
                generator = torch.Generator(self._device).manual_seed(0) if temperature > 0 else None

                def stopped(new: list[int], until: list[str] = until) -> bool:
                    text = self.tok_decode(new)
                    return any(stop and stop in text for stop in until)

                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in batch]
                    new = generate(
                        self._forward,  # type: ignore[arg-type] - a Transformer's forward, padded, in lockstep
                        [p[-max(1, self.max_length - max_new) :] for p in prompts],
                        max_new,
                        temperature=temperature,
                        generator=generator,
                        stop_ids=[self.eos_id],
                        stop=stopped,
                    )
                    for i, tokens in zip(batch, new):
                        text = self.tok_decode(tokens)
                        for stop in until:
                            if stop:
                                text = text.split(stop)[0]
                        outputs[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    @contextmanager
    def _scoring(self) -> Iterator[None]:
        """Eval mode and no gradients for a batch of requests, then as before; every process runs as many forward
        passes as the busiest one."""
        training, grad = self.model.training, torch.is_grad_enabled()
        self.model.eval()
        torch.set_grad_enabled(False)
        try:
            yield
            self._forward.finish()
        finally:
            torch.set_grad_enabled(grad)
            self.model.train(training)

    # -- distribution (lm-eval's evaluator splits requests by rank and gathers the metrics) ---------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        gathered = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(gathered, tensor.contiguous(), group=self._group)
        return torch.stack(gathered) if tensor.dim() == 0 else torch.cat(gathered)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self._world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self._world_size
        dist.all_gather_object(gathered, obj, group=self._group)
        return gathered if self._rank == dst else None

    def barrier(self) -> None:
        if self._distributed:
            dist.barrier()


# -- tasks -----------------------------------------------------------------------------------------------------
@dataclass
class TaskSpec:
    """What the user gave (`name`) and what lm-eval loads: a registered task name or an inline task config."""

    name: str
    spec: str | dict[str, Any]


PREPARED = "prepared:"  # `prepared:NAME`: the task `lit-open prepare` wrote beside the data (<data dir>/tasks/NAME)


def resolve_tasks(tasks: Sequence[str], key: str = "tasks", data_dir: Path | None = None) -> list[TaskSpec]:
    """Local task directories / YAML files as inline configs (data files resolved next to the YAML), names as they
    are, checked against lm-eval's registry. `key` names the option in error messages. `data_dir`: the directory
    `lit-open prepare` wrote the run's data and tokenizer to, where `prepared:NAME` tasks are."""
    if not tasks:
        raise UserError(f"{key} is empty: give lm-eval task names (e.g. [hellaswag]) or local task directories.")
    specs: list[TaskSpec] = []
    names: list[str] = []
    for task in tasks:
        if str(task).startswith(PREPARED):
            task = _prepared_task(str(task), key, data_dir)
        path = Path(str(task)).expanduser()
        looks_like_path = path.suffix in (".yaml", ".yml") or "/" in str(task) or path.exists()
        if not looks_like_path:
            names.append(str(task))
            specs.append(TaskSpec(str(task), str(task)))
            continue
        if not path.exists():
            raise UserError(
                f"{key}: {str(task)!r} does not exist. Give a local task directory (YAML task configs with their "
                "data, e.g. JSONL) or a task YAML file, or an lm-eval task name such as hellaswag."
            )
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        found = 0
        for file in files:
            try:
                config = load_lm_eval_task_yaml(file)
            except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
                raise UserError(f"{key}: cannot read the task config {file}: {err}") from None
            if not isinstance(config.get("task"), str):
                continue  # a group or a shared base config
            specs.append(TaskSpec(config["task"], _local_data_files(config, file.parent)))
            found += 1
        if not found:
            raise UserError(
                f"{key}: {str(task)!r} holds no lm-eval task config (a YAML file with a `task:` name, e.g. "
                "task, dataset_path: json, dataset_kwargs.data_files, output_type, doc_to_text, ...)."
            )
    if names:
        _check_names(names, key)
    return specs


def _prepared_task(task: str, key: str, data_dir: Path | None) -> str:
    if data_dir is None:
        raise UserError(
            f"{key}: {task!r} names a task that `lit-open prepare` wrote beside the run's data, but where that data "
            "was prepared is unknown: set data.tokenizer to the prepared tokenizer.json, or give the task's path."
        )
    path = data_dir / "tasks" / task.removeprefix(PREPARED)
    if not path.is_dir():
        raise UserError(
            f"{key}: {task!r} would be {path}, which does not exist. `lit-open prepare` writes tasks/next_line there "
            "when it holds documents out (val_fraction > 0) and they give at least 20 items; prepare the data again "
            "with val_fraction > 0, or give another task (a recipe's in-loop benchmark goes with plugins=[])."
        )
    return str(path)


def _local_data_files(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`dataset_kwargs.data_files` relative to the YAML's directory (lm-eval reads them relative to the CWD)."""
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if data_files is None:
        return config

    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            return value if Path(value).is_absolute() else str((directory / value).resolve())
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    return {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": resolve(data_files)}}


def _check_names(names: list[str], key: str) -> None:
    known = set(_task_manager(True).all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise UserError(
                f"{key}: {name!r} is not an lm-eval task, nor a local path.{hint} Give lm-eval task names (see "
                "`lm-eval ls tasks`) or local task directories / YAML files."
            )


_managers: dict[bool, Any] = {}


def _task_manager(with_defaults: bool) -> Any:
    """lm-eval's task registry; without its bundled tasks (about 15 000 configs, 5 s to index) when not needed."""
    if with_defaults not in _managers:
        _managers[with_defaults] = TaskManager(include_defaults=with_defaults)
    return _managers[with_defaults]


def load_tasks(specs: Sequence[TaskSpec], num_fewshot: int | None = None, seed: int = 1234) -> dict[str, Any]:
    """lm-eval's task dict (`TaskManager.load`): datasets are read now, once, and reused by every `run_tasks`.

    seed: of the few-shot examples' choice (lm-eval's default), the same in the training loop and offline.
    """
    manager = _task_manager(any(isinstance(s.spec, str) for s in specs))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating test split": noise between the trainer's lines
    try:
        task_dict = manager.load([s.spec for s in specs])
    except Exception as err:  # noqa: BLE001 - datasets, hub and YAML errors all mean the task cannot be loaded
        raise UserError(
            f"lm-eval could not load the tasks {', '.join(s.name for s in specs)}: {type(err).__name__}: {err}. "
            "Tasks by name need their datasets on the Hugging Face hub or in HF_DATASETS_CACHE; local task "
            "directories need their data files."
        ) from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    for task in task_dict["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    return task_dict


# -- running -----------------------------------------------------------------------------------------------------
@dataclass
class EvalOutcome:
    metrics: dict[str, float]  # "eval/<task>/<metric>": value (filters other than "none" as <metric>_<filter>)
    results: dict[str, Any] | None  # lm-eval's own results (None on processes other than data-parallel rank 0)
    seconds: float


def run_tasks(lm: LitOpenLM, task_dict: dict[str, Any], limit: int | None = None) -> EvalOutcome:
    """Evaluate `task_dict` (from `load_tasks`) with `lm`; every process of a distributed model must call this."""
    started = time.perf_counter()
    with lm_eval_progress_bars_off():
        results = evaluate(
            lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING"
        )
    seconds = time.perf_counter() - started
    return EvalOutcome(flat_metrics(results) if results else {}, dict(results) if results else None, seconds)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    flat = {}
    for task, values in results["results"].items():
        for name, value in values.items():
            metric, _, filter_name = name.partition(",")
            if "_stderr" in metric or not isinstance(value, numbers.Real) or isinstance(value, bool):
                continue
            if metric in ("alias", "sample_len"):
                continue
            suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
            flat[f"eval/{task}/{metric}{suffix}"] = float(value)
    return flat


def use_datasets_cache(directory: str | Path | None, previous: Any = None) -> Any:
    """Cache the datasets of tasks in `directory` (HF_DATASETS_CACHE, also for a `datasets` imported already);
    returns what to pass back as `use_datasets_cache(None, previous)` to restore the settings before."""
    if directory is None:
        env, config = previous
        if env is None:
            os.environ.pop("HF_DATASETS_CACHE", None)
        else:
            os.environ["HF_DATASETS_CACHE"] = env
        datasets.config.HF_DATASETS_CACHE = config
        return None
    before = (os.environ.get("HF_DATASETS_CACHE"), datasets.config.HF_DATASETS_CACHE)
    os.environ["HF_DATASETS_CACHE"] = str(directory)
    datasets.config.HF_DATASETS_CACHE = Path(directory)
    return before
