"""Hugging Face checkpoints on the hub or on disk: `hf:ORG/NAME@REVISION` and `hf:/local/dir` -> a local directory.

`resolve_source` finds the directory of a checkpoint: a hub repo is downloaded through
`huggingface_hub.snapshot_download` at its revision (config, weights in one format, tokenizer and generation config
only), a local directory is used as it is. What the directory holds is read by `lit_open.checkpoint.hf`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from filelock import FileLock

from lit_open.errors import UserError, first_line

HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
SAFE_PATTERNS = ["model*.safetensors", SAFE_INDEX]
BIN_PATTERNS = ["pytorch_model*.bin", BIN_INDEX]
HUB_PATTERNS = [CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES]


def resolve_source(source: str, revision: str | None = None) -> tuple[Path, dict]:
    """The local directory of a Hugging Face checkpoint and where it came from.

    `hf:ORG/NAME@REV` (or `hf:ORG/NAME`: the default branch) is downloaded with huggingface_hub at that revision
    (config, weights in one format, tokenizer and generation config only); an explicit `revision` overrides `@REV`.
    `hf:/local/dir` (also `hf:./dir`, `hf:~/dir`, or an existing relative path) and a plain existing directory are
    used as they are. Provenance: {"repo", "revision", "commit"} for a hub source (the commit of the snapshot), {}
    for a local directory. (The spec itself is the caller's: `init_from` events record it as `source`.)
    """
    spec = str(source)
    if spec.startswith(HF_PREFIX):
        rest = spec[len(HF_PREFIX) :]
        if not rest:
            raise UserError(
                f"{spec!r} names no checkpoint: give hf:ORG/NAME@REVISION (a hub repo at a branch, tag or commit) "
                "or hf:/path/to/dir (a Hugging Face directory on disk)."
            )
        if rest.startswith(("/", ".", "~")) or Path(rest).expanduser().exists():
            return _local_source(Path(rest).expanduser(), spec, revision), {}
        repo, _, at = rest.partition("@")
        return _download(spec, repo, revision or at or None)
    return _local_source(Path(spec).expanduser(), spec, revision), {}


def hub_revision(source: str) -> str | None:
    """The revision named in `hf:ORG/NAME@REV` (None for another spec, or a hub repo without @REV)."""
    spec = str(source)
    if not spec.startswith(HF_PREFIX):
        return None
    rest = spec[len(HF_PREFIX) :]
    if rest.startswith(("/", ".", "~")):
        return None
    return rest.partition("@")[2] or None


def _local_source(path: Path, spec: str, revision: str | None) -> Path:
    if revision is not None:
        raise UserError(
            f"revision={revision!r} was given for {spec!r}, a local directory; revisions select a commit of a hub "
            "repo (hf:ORG/NAME@REVISION). Drop the revision, or name the hub repo."
        )
    if not path.exists():
        raise UserError(
            f"{spec!r}: no such directory {str(path)!r}. Point at a Hugging Face checkpoint directory (with "
            "config.json and the weights), as hf:/path/to/dir, or at a hub repo as hf:ORG/NAME@REVISION."
        )
    if not path.is_dir():
        hint = (
            f" (its directory {str(path.parent)!r}?)" if path.name in (CONFIG_FILE, SAFE_WEIGHTS, BIN_WEIGHTS) else ""
        )
        raise UserError(
            f"{spec!r} is a file, not a directory: a Hugging Face checkpoint is a directory with config.json and "
            f"the weights; give that directory{hint}."
        )
    return path


def hub_offline(*also: str) -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE (or one of the variables `also` names) set: no network access to the
    hub. Read at each call, not when huggingface_hub is imported."""
    return any(
        os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *also)
    )


def _download(spec: str, repo: str, revision: str | None) -> tuple[Path, dict]:
    # imported here: only hub specs need it, and it loads an HTTP stack
    import huggingface_hub

    offline = hub_offline()
    patterns = HUB_PATTERNS + SAFE_PATTERNS + BIN_PATTERNS
    if not offline:
        try:  # one format only: repos that ship both safetensors and .bin would be downloaded twice
            files = huggingface_hub.HfApi().list_repo_files(repo, revision=revision)
            if any(re.fullmatch(r"model.*\.safetensors", f) for f in files):
                patterns = HUB_PATTERNS + SAFE_PATTERNS
            elif any(re.fullmatch(r"pytorch_model.*\.bin", f) for f in files):
                patterns = HUB_PATTERNS + BIN_PATTERNS
        except Exception:  # noqa: BLE001 - snapshot_download below reports the problem (or finds the cache)
            pass
    where = f"{repo} at revision {revision or 'main'}"
    local_hint = (
        "Download it where the hub can be reached (e.g. `hf download "
        f"{repo}{' --revision ' + revision if revision else ''} --local-dir DIR`) and point at the directory: "
        "init_from=hf:/path/to/dir (lit_open.load_hf('/path/to/dir') in Python)."
    )
    # Several processes of a run may ask at once (torchrun, SLURM: before any process group exists): one per cache
    # downloads, the others wait for its lock and then find the snapshot in the cache.
    lock = Path(huggingface_hub.constants.HF_HUB_CACHE) / ".locks" / f"lit-open-{_key(repo, revision)}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(lock):
            directory = Path(
                huggingface_hub.snapshot_download(
                    repo, revision=revision, allow_patterns=patterns, local_files_only=offline
                )
            )
    except Exception as err:  # offline, no network, hub errors: all mean "could not get it from the hub"
        hint = f"Check the ORG/NAME@REVISION, or point at a local copy. {local_hint}"
        known = hub_answer(err, spec, repo, revision, hint=hint)
        if known is not None:
            raise known from err
        reason = (
            "HF_HUB_OFFLINE is set, so only the local huggingface_hub cache was searched, and it does not hold "
            "this revision"
            if offline
            else f"the hub could not be reached or refused ({type(err).__name__}: {first_line(err)})"
        )
        raise UserError(f"Could not download {spec} ({where}): {reason}. {local_hint}") from err
    commit = directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else None
    return directory, {"repo": repo, "revision": revision or "main", "commit": commit}


def hub_answer(
    err: Exception, where: str, repo: str, revision: str | None, repo_type: str = "model", hint: str = ""
) -> UserError | None:
    """The hub's refusal `err` of `repo`@`revision` (gated, no such repo or revision, a bad id) in the user's words,
    naming `where` (the spec as typed); None for any other failure (the network, offline mode)."""
    # imported here: only hub lookups get here, and it loads an HTTP stack
    from huggingface_hub import errors as hub_errors

    kind = "dataset" if repo_type == "dataset" else "repo"
    refs = f"huggingface_hub.list_repo_refs({repo!r}" + (", repo_type='dataset')" if repo_type == "dataset" else ")")
    if isinstance(err, hub_errors.GatedRepoError):  # before RepositoryNotFoundError: it is one
        text = f"the {kind} {repo} is gated; accept its terms on huggingface.co and log in (`hf auth login`, HF_TOKEN)"
    elif isinstance(err, hub_errors.RepositoryNotFoundError):
        text = f"the hub has no {kind} {repo!r} (or it is private: log in with `hf auth login` or set HF_TOKEN)"
    elif isinstance(err, hub_errors.RevisionNotFoundError):
        text = f"the {kind} {repo} has no revision {revision!r}; give a branch, tag or commit of it (see {refs})"
    elif isinstance(err, hub_errors.HFValidationError):
        text = f"{repo!r} is not a valid hub id ({first_line(err)})"
    else:
        return None
    return UserError(f"{where}: {text}." + (f" {hint}" if hint else ""))


def _key(repo: str, revision: str | None) -> str:
    return hashlib.sha256(f"{repo}@{revision or 'main'}".encode()).hexdigest()[:16]
