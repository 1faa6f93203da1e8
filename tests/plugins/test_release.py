"""release: when exports happen (steps, tokens, end) and its options; pushes to the hub as branches, against
huggingface_hub's own HfApi with a fake hub behind its HTTP client. The exports themselves are tested end to end in
tests/e2e/test_finetune.py (transformers loads them; metadata, tokenizer, convert)."""

from __future__ import annotations

import base64
import json
import threading
from hashlib import sha1
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import httpx2
import huggingface_hub
import pytest
from conftest import bind_run, cli_here, tiny_overrides
from huggingface_hub.utils._http import default_client_factory

from lit_open.checkpoint.hub_push import HubPusher, Push
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.model import ModelConfig
from lit_open.plugins.release import Release, branch_name, summary_line
from lit_open.train import run
from lit_open.train.events import read_events


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


# -- pushes to the hub ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "index", "step", "tokens", "branch"),
    [
        ("step{step}", 3, 3000, 3000 * 1024 * 2048, "step3000"),  # Pythia: EleutherAI/pythia-160m@step3000
        ("ckpt_{index:03d}", 120, 0, 0, "ckpt_120"),  # LLM360: LLM360/Amber@ckpt_120
        # OLMo 2 rounds the tokens up to whole billions: 20.97B, 4.19B and 4000.02B
        ("stage{stage}-step{step}-tokens{tokens_b}B", 0, 10000, 10000 * 512 * 4096, "stage1-step10000-tokens21B"),
        ("stage{stage}-step{step}-tokens{tokens_b}B", 0, 1000, 1000 * 1024 * 4096, "stage1-step1000-tokens5B"),
        (
            "stage{stage}-step{step}-tokens{tokens_b}B",
            0,
            1907359,
            1907359 * 512 * 4096,
            "stage1-step1907359-tokens4001B",
        ),
        ("{run}/{tokens}", 0, 0, 0, "demo/0"),
    ],
)
def test_branch_templates_of_the_labs(template, index, step, tokens, branch):
    assert branch_name(template, index, step, tokens, 1, "demo") == branch


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"branch": "v{version}"}, r"unknown field \{version\}: the fields are index, step, tokens, tokens_b, stage"),
        ({"branch": "step{}"}, r"unknown field \{\}"),
        ({"branch": "step{step:q}"}, r"plugins.release.branch='step\{step:q\}' cannot be formatted"),
        ({"branch": "step{step"}, "is not a format template"),
        ({"branch": "step {step}"}, "makes the branch name 'step 0'"),
        ({"push_to": "no-org"}, "push_to='no-org' is not a hub repo id"),
        ({"dry_run": True}, "set push_to=ORG/NAME"),
        ({"retries": -1}, "retries=-1 must be 0 or positive"),
    ],
)
def test_bad_push_options_name_the_key(options, message):
    with pytest.raises(UserError, match=message):
        Release(**options)


def test_a_bad_template_stops_the_cli_with_exit_status_2(tiny_data, tmp_path):
    result = cli_here(
        "train",
        *tiny_overrides(tiny_data, tmp_path / "run"),
        "plugins=[release]",
        "plugins.release.branch='v{version}'",
    )
    assert result.returncode == 2, result.stderr
    assert "plugins.release.branch='v{version}' uses the unknown field {version}" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def push_run_state(tmp_path: Path, plugin: Release) -> None:
    bind_run(plugin, tmp_path, config=SimpleNamespace(run=SimpleNamespace(name="demo")))


def test_pushing_needs_a_token_and_the_network_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    plugin = Release(push_to="org/model")
    push_run_state(tmp_path, plugin)
    with pytest.raises(UserError, match=r"no Hugging Face token was found: set HF_TOKEN .* `hf auth login`"):
        plugin.setup(None, None, "fit")
    dry = Release(push_to="org/model", dry_run=True)
    push_run_state(tmp_path, dry)
    dry.setup(None, None, "fit")  # a dry run uploads nothing: no token needed

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        plugin.setup(None, None, "fit")
    bind_run(plugin, None)  # `lit-open eval` (no run directory) pushes nothing and checks nothing
    plugin.setup(None, None, "validate")


def test_a_push_without_a_token_stops_the_cli_before_the_first_step(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    run_dir = tmp_path / "run"
    options = ["plugins=[release]", "plugins.release.push_to=org/model"]
    result = cli_here("train", *tiny_overrides(tiny_data, run_dir), *options)
    assert result.returncode == 2, result.stderr
    assert "plugins.release.push_to is set but no Hugging Face token was found: set HF_TOKEN" in result.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "hf").exists()


def test_a_run_name_that_makes_no_branch_is_refused_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    plugin = Release(push_to="org/model", branch="{run}-step{step}")
    bind_run(plugin, tmp_path, config=SimpleNamespace(run=SimpleNamespace(name="my run")))
    with pytest.raises(UserError, match=r"makes the branch name 'my run-step0' \(run.name='my run'\)"):
        plugin.setup(None, None, "fit")


class FakeHub:
    """The hub endpoints HfApi uses to create a repo and a branch and to commit a folder of small ("regular") files,
    behind httpx2.MockTransport: each branch's files in memory. `fail_commits` makes every commit a connection error.
    """

    def __init__(self, fail_commits: bool = False) -> None:
        self.fail_commits = fail_commits
        self.repos: set[str] = set()
        # what a repo made on the website may hold: a stale file on main must not reach a release branch
        self.branches = {
            "main": {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "old": b"x"}
        }
        self.calls: list[tuple[str, str]] = []  # (method, endpoint) in order
        self.lock = threading.Lock()  # the pusher's thread and the test's

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        with self.lock:
            return self._handle(request)

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        parts = [unquote(p) for p in request.url.raw_path.decode().split("?")[0].split("/")]
        assert request.headers["authorization"] == "Bearer hf_fake"
        if parts[1:4] == ["api", "repos", "create"]:
            body = json.loads(request.content)
            repo = f"{body['organization']}/{body['name']}"
            self.calls.append(("create", repo))
            if repo in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": repo})
            self.repos.add(repo)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})
        if parts[1:3] == ["api", "validate-yaml"]:
            return httpx2.Response(200, json={})
        assert parts[1:3] == ["api", "models"] and "/".join(parts[3:5]) in self.repos, request.url
        endpoint, revision = parts[5], parts[6]
        self.calls.append((endpoint, revision))
        if endpoint == "branch":
            if revision in self.branches:
                return httpx2.Response(409, json={"error": "Reference already exists"})
            self.branches[revision] = dict(self.branches["main"])  # no startingPoint: from the default branch
            return httpx2.Response(200, json={})
        files = self.branches[revision]
        if endpoint == "tree":
            listing = [
                {"type": "file", "path": p, "size": len(b), "oid": sha1(b).hexdigest()} for p, b in files.items()
            ]
            return httpx2.Response(200, json=listing)
        if endpoint == "preupload":
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(request.content)["files"]
            ]
            return httpx2.Response(200, json={"files": modes})
        assert endpoint == "commit"
        if self.fail_commits:
            raise httpx2.ConnectError("connection refused", request=request)
        for line in request.content.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                del files[item["value"]["path"]]
        oid = sha1(repr(sorted(files.items())).encode()).hexdigest()
        return httpx2.Response(
            200, json={"commitUrl": f"https://huggingface.co/org/model/commit/{oid}", "commitOid": oid}
        )


@pytest.fixture
def hub(monkeypatch):
    """A FakeHub behind huggingface_hub's own HTTP client, with a fake token, xet off (so no upload leaves plain
    HTTP) and offline mode off."""
    fake = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # read when huggingface_hub loaded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read when huggingface_hub loaded
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # lit-open reads them at each call
        monkeypatch.delenv(variable, raising=False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle)))
    yield fake
    huggingface_hub.set_client_factory(default_client_factory)


PUSH_RUN = {
    "trainer.validate_at_start": "false",
    "trainer.val_check_interval": 0,
    "logger.tensorboard": "false",
    "checkpoint.every_n_steps": 4,
}


def train_with_release(tiny_data, run_dir: Path, steps: int, *options: str) -> dict:
    overrides = tiny_overrides(tiny_data, run_dir, **{**PUSH_RUN, "trainer.max_steps": steps})
    release = ["plugins=[release]", "plugins.release.dtype=null", "plugins.release.retry_backoff_s=0"]
    return run(load_train_config([*overrides, *release, *options]))


def local_files(export: Path) -> dict[str, bytes]:
    return {p.relative_to(export).as_posix(): p.read_bytes() for p in export.rglob("*") if p.is_file()}


def test_releases_are_pushed_as_branches_holding_exactly_the_exports(hub, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    options = ["plugins.release.every_n_steps=2", "plugins.release.push_to=org/model"]
    options.append("plugins.release.branch='ckpt_{index:03d}-step{step}'")
    train_with_release(tiny_data, run_dir, 4, *options)  # releases at steps 2 and 4 ...
    first = capsys.readouterr().err
    train_with_release(tiny_data, run_dir, 6, *options)  # ... and, resumed from step 4, at step 6: index 2

    branches = {"ckpt_000-step2": 2, "ckpt_001-step4": 4, "ckpt_002-step6": 6}
    assert set(hub.branches) == {"main", *branches}
    assert hub.branches["main"] == FakeHub().branches["main"]  # untouched
    for branch, step in branches.items():
        export = run_dir / "hf" / f"step-{step:08d}"
        files = local_files(export)
        assert {"config.json", "model.safetensors", "tokenizer.json", "lit_open.json", "README.md"} <= set(files)
        assert hub.branches[branch] == {**files, ".gitattributes": hub.branches["main"][".gitattributes"]}
        card = files["README.md"].decode()
        assert f'from_pretrained("org/model", revision="{branch}")' in card and "(lit_open.json)" in card
        assert f"[0, {step})" in card and str(run_dir / "data_sequence") in card and "train/loss" in card
    assert [c for c in hub.calls if c[0] == "create"] == [("create", "org/model")] * 2  # once per session

    pushed = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "release_pushed"]
    assert [(e["step"], e["branch"], e["attempts"]) for e in pushed] == [(s, b, 1) for b, s in branches.items()]
    assert all(e["url"].endswith(e["commit"]) and e["plugin"] == "release" for e in pushed)
    assert "release: pushed 2 of 2 exports to org/model (branches ckpt_000-step2, ckpt_001-step4)" in first
    assert "release: pushed 1 of 1 exports to org/model (branches ckpt_002-step6)" in capsys.readouterr().err


def test_a_push_that_keeps_failing_is_retried_reported_and_training_completes(hub, tiny_data, tmp_path, capsys):
    hub.fail_commits = True
    run_dir = tmp_path / "run"
    options = ["plugins.release.push_to=org/model", "plugins.release.retries=2"]
    summary = train_with_release(tiny_data, run_dir, 2, *options)

    assert summary["steps"] == 2 and (run_dir / "checkpoints" / "step-00000002.ckpt").exists()
    assert [c for c in hub.calls if c[0] == "commit"] == [("commit", "step2")] * 3  # the first attempt + 2 retries
    (failed,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"].startswith("release_push")]
    assert failed["event"] == "release_push_failed" and failed["branch"] == "step2" and failed["attempts"] == 3
    assert failed["error"] == "ConnectError: connection refused"
    err = capsys.readouterr().err
    assert "release: pushed 0 of 1 exports to org/model; 1 failed: step2 after 3 attempts (ConnectError" in err
    assert "Done:" in err


def test_a_dry_run_records_the_pushes_and_uploads_nothing(hub, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # a dry run needs no token
    run_dir = tmp_path / "run"
    options = ["plugins.release.every_n_steps=2", "plugins.release.push_to=org/model", "plugins.release.dry_run=true"]
    options.append("plugins.release.branch='stage{stage}-step{step}-tokens{tokens_b}B'")
    train_with_release(tiny_data, run_dir, 4, *options)

    plan = [json.loads(line) for line in (run_dir / "hf" / "push_plan.jsonl").read_text().splitlines()]
    assert [(p["repo"], p["branch"], p["step"]) for p in plan] == [
        ("org/model", "stage1-step2-tokens1B", 2),
        ("org/model", "stage1-step4-tokens1B", 4),
    ]
    for p in plan:
        assert p["files"] == sorted(local_files(Path(p["folder"])))
        assert "README.md" in p["files"]
    assert hub.calls == [] and not any(
        e["event"].startswith("release_push") for e in read_events(run_dir / "events.jsonl")
    )


def test_the_wait_at_the_end_is_bounded_and_the_line_names_what_was_not_pushed(monkeypatch, tmp_path):
    release = threading.Event()
    monkeypatch.setattr(HubPusher, "_push_once", lambda self, push: release.wait() and ("0" * 40, "url"))
    pusher = HubPusher("org/model", private=True, retries=0, backoff_s=0, on_outcome=lambda outcome: None)
    pusher.submit(Push(tmp_path, "step2", "message", 2))
    reports = []
    assert not pusher.drain(0.05, lambda pending, waited: reports.append(pending))
    assert reports == [1]
    assert summary_line(pusher).startswith("release: pushed 0 of 1 exports to org/model; 1 not pushed when the run")
    release.set()
    assert pusher.drain(5, lambda pending, waited: None)
    assert summary_line(pusher) == "release: pushed 1 of 1 exports to org/model (branches step2)"
