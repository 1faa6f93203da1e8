"""The next-line benchmark prepare writes from held-out documents: valid items, balanced answers, an lm-eval YAML."""

from __future__ import annotations

import json
from collections import Counter

import yaml

from lit_open.data.next_line import CHOICES, CONTEXT_LINES, write_next_line_task


def documents(n: int = 12) -> list[tuple[str, str]]:
    return [(f"doc{d}", "\n".join(f"line {i} of document {d} says {i * d}" for i in range(30))) for d in range(n)]


def test_items_pick_the_true_next_line_among_lines_of_other_documents(tmp_path):
    docs = dict(documents())
    count = write_next_line_task(docs.items(), tmp_path, seed=0)
    items = [json.loads(line) for line in (tmp_path / "next_line.jsonl").read_text().splitlines()]
    assert count == len(items) == 12 * 8  # 8 items per document
    for item in items:
        choices, label = item["choices"], item["label"]
        assert len(choices) == len(set(choices)) == CHOICES
        context = item["context"].rstrip("\n").split("\n")
        assert len(context) == CONTEXT_LINES and item["context"].endswith("\n")
        source = next(d for d, text in docs.items() if item["context"] in text + "\n")
        lines = docs[source].split("\n")
        at = lines.index(context[-1]) + 1
        assert choices[label] == lines[at]  # the line that follows the context in its document
        assert all(c not in docs[source] for i, c in enumerate(choices) if i != label)  # others: other documents
    positions = Counter(item["label"] for item in items)
    assert set(positions) == set(range(CHOICES)) and max(positions.values()) < 0.4 * len(items)  # chance is 25%


def test_the_task_yaml_is_an_lm_eval_multiple_choice_task_over_the_jsonl(tmp_path):
    write_next_line_task(documents(), tmp_path, seed=0)
    task = yaml.safe_load((tmp_path / "next_line.yaml").read_text())
    assert task["task"] == "next_line" and task["output_type"] == "multiple_choice"
    assert task["dataset_kwargs"]["data_files"]["test"] == "next_line.jsonl"
    fields = (task["doc_to_text"], task["doc_to_choice"], task["doc_to_target"])
    assert fields == ("{{context}}", "{{choices}}", "label")


def test_too_few_documents_write_nothing(tmp_path):
    assert write_next_line_task(documents(1)[:1], tmp_path / "none", seed=0) == 0
    assert not (tmp_path / "none").exists()


def test_prepare_writes_the_task_from_its_held_out_documents(tiny_data):
    items = (tiny_data / "tasks" / "next_line" / "next_line.jsonl").read_text().splitlines()
    corpus = "\n".join(p.read_text() for p in (tiny_data.parent / "corpus").iterdir())
    assert len(items) >= 20
    for item in map(json.loads, items[:20]):
        assert item["context"] + item["choices"][item["label"]] in corpus
