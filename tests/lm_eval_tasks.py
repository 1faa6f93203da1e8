"""Local lm-eval tasks made from the tiny_data corpus, and a tiny model trained on it, for the lm-eval tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lit_open.data.next_line import TASK_YAML as NEXT_LINE  # the format of prepare's own next_line benchmark
from lit_open.model import ModelConfig, Transformer

TINY_CONFIG = ModelConfig(
    n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=512, pad_vocab_multiple=64, max_seq_len=64
)

CORPUS_PPL = """\
task: corpus_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: corpus_ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

LINE_END = """\
task: line_end
dataset_path: json
dataset_kwargs:
  data_files:
    test: line_end.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def corpus_lines(corpus: Path) -> list[str]:
    lines = []
    for file in sorted(p for p in corpus.iterdir() if p.suffix == ".py"):
        lines += [line.strip() for line in file.read_text().splitlines() if 24 <= len(line.strip()) <= 60]
    return lines


def write_local_tasks(corpus: Path, out: Path, docs: int = 24, generation: bool = False) -> Path:
    """A task directory: next_line (multiple choice: which ending completes this line of code) and corpus_ppl
    (perplexity of corpus excerpts longer than the model's context, of unequal lengths), and with `generation`
    line_end (greedy completion of a line). Data files are named relative to the YAML files."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = rng.sample(corpus_lines(corpus), docs * 4)
    with (out / "next_line.jsonl").open("w") as f:
        for i in range(docs):
            group = lines[4 * i : 4 * i + 4]
            cut = len(group[0]) // 2
            right = group[0][cut:]
            # distractors: another line's ending and two shuffles of the right one (a tiny model tells those apart)
            shuffles = ["".join(rng.sample(right, len(right))) for _ in range(2)]
            choices = [right, group[1][len(group[1]) // 2 :], *shuffles]
            label = rng.randrange(4)
            choices[0], choices[label] = choices[label], choices[0]
            f.write(json.dumps({"context": group[0][:cut], "choices": choices, "label": label}) + "\n")
    files = sorted(p for p in corpus.iterdir() if p.suffix == ".py")
    with (out / "corpus_ppl.jsonl").open("w") as f:
        for i, file in enumerate(files[: docs // 4]):  # unequal lengths: 2 to 6 windows of the model's context
            f.write(json.dumps({"text": file.read_text()[: 300 + 300 * (i % 3)]}) + "\n")
    (out / "next_line.yaml").write_text(NEXT_LINE)
    (out / "corpus_ppl.yaml").write_text(CORPUS_PPL)
    if generation:
        with (out / "line_end.jsonl").open("w") as f:
            for line in lines[: docs // 2]:
                f.write(json.dumps({"prompt": line[: len(line) - 4], "answer": line[len(line) - 4 :]}) + "\n")
        (out / "line_end.yaml").write_text(LINE_END)
    return out


def trained_tiny_model(data: Path, steps: int = 40, seed: int = 0) -> Transformer:
    """TINY_CONFIG trained for a few steps on the corpus of tiny_data, so that its answers are not all alike."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    tokens: list[int] = []
    for file in sorted((data.parent / "corpus").iterdir())[:12]:
        tokens += tokenizer.encode(file.read_text()).ids + [eos]
    stream = torch.tensor(tokens)
    torch.manual_seed(seed)
    model = Transformer(TINY_CONFIG)
    model.init_weights(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 65, (16,), generator=generator)
        batch = torch.stack([stream[s : s + 65] for s in starts.tolist()])
        logits = model(batch[:, :-1])[..., : TINY_CONFIG.vocab_size]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
