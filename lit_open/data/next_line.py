"""A multiple-choice benchmark made from held-out documents: which of four lines comes next?

`lit-open prepare` writes it next to the data it prepares (`<output>/tasks/next_line/`, an lm-eval task: a YAML
file and a JSONL file) when it holds documents out. Each item shows a few consecutive lines of a held-out document
and offers four candidates for the line that follows: the true one and three lines drawn from other held-out
documents. Chance is 25%; a model that learned the data's structure (code indentation, what follows a `def`, prose
continuing a sentence) does clearly better, so it is a small, offline, always-available in-loop benchmark. The
documents are held out from training, so the task measures generalisation, not memory.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

TASK_NAME = "next_line"
CONTEXT_LINES = 4  # lines shown before the one to pick
CHOICES = 4
MIN_CHARS, MAX_CHARS = 12, 100  # candidate lines: long enough to tell apart, short enough to fit a small context


def write_next_line_task(documents: Iterable[tuple[str, str]], out_dir: Path, seed: int, max_items: int = 500) -> int:
    """Write `<out_dir>/next_line.yaml` and `next_line.jsonl` from `(document key, text)` pairs; return the items.

    Nothing is written (0 returned) when the documents give fewer than 20 items.
    """
    rng = random.Random(seed)
    lines_by_doc: list[tuple[str, list[str]]] = [(key, text.splitlines()) for key, text in documents]
    counts = Counter(line.strip() for _, lines in lines_by_doc for line in lines)

    def candidate(line: str) -> bool:  # distinctive: the answer must not be one of the distractors in disguise
        stripped = line.strip()
        return MIN_CHARS <= len(stripped) <= MAX_CHARS and counts[stripped] == 1

    pool = [(key, line) for key, lines in lines_by_doc for line in lines if candidate(line)]
    items = []
    for key, lines in lines_by_doc:
        others = [line for other_key, line in pool if other_key != key]  # distinct lines (counted once above)
        if len(others) < CHOICES - 1:
            continue
        positions = [i for i in range(CONTEXT_LINES, len(lines)) if candidate(lines[i])]
        for i in rng.sample(positions, min(len(positions), 8)):  # a few items per document: spread over documents
            context = lines[i - CONTEXT_LINES : i]
            if sum(len(c.strip()) for c in context) < MIN_CHARS:
                continue
            choices = [lines[i], *rng.sample(others, CHOICES - 1)]
            rng.shuffle(choices)
            items.append({"context": "\n".join(context) + "\n", "choices": choices, "label": choices.index(lines[i])})
    if len(items) < 20:
        return 0
    rng.shuffle(items)
    items = items[:max_items]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{TASK_NAME}.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    (out_dir / f"{TASK_NAME}.yaml").write_text(TASK_YAML)
    return len(items)


TASK_YAML = f"""\
# Written by `lit-open prepare` from its held-out documents: pick the line that comes next among {CHOICES}.
task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASK_NAME}.jsonl  # relative to this file's directory (lit-open resolves it)
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
