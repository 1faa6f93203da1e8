"""The `lit-open` console script: train, prepare, eval, convert, report, list; arguments after the command are
`key=value` overrides (Hydra's grammar for every command)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

from lit_open.errors import EXIT_INTERRUPTED, EXIT_STOPPED, RunInterrupted, RunStopped, UserError

USAGE = """\
usage: lit-open COMMAND [key=value ...]

commands:
  train     train a model; with no arguments, the quickstart recipe (a small model on the CPU, on the
            Python standard library). `lit-open train recipe=olmo2_1b data.sources=[{path:DIR}] ...`
            `lit-open train --config RUN_DIR/config.yaml [key=value ...]` reruns or continues a run.
  prepare   tokenize text into litdata chunks:
            `lit-open prepare inputs=[a.jsonl,dir/,stdlib] output=DIR [tokenizer=tokenizer.json] [val_fraction=0.01]`
            `lit-open prepare inputs=[hf-dataset:ORG/NAME@REV:SPLIT] output=DIR val_fraction=0.01 val_by_input=true`
  eval      held-out loss of a checkpoint: `lit-open eval checkpoint=RUN_DIR/checkpoints/step-00000300.ckpt`;
            lm-eval benchmarks of a run checkpoint or a Hugging Face directory (hf:/dir):
            `lit-open eval checkpoint=CKPT_OR_HF tasks=[hellaswag,my_tasks/] [limit=200] [num_fewshot=0] [out=FILE]`
  convert   a run checkpoint to a Hugging Face directory, or a Hugging Face checkpoint to lit-open weights:
            `lit-open convert source=RUN_DIR/checkpoints/step-00000300.ckpt out=DIR [dtype=bfloat16]`
            `lit-open convert source=hf:EleutherAI/pythia-160m@step3000 out=pythia.ckpt`
  report    curves of a run (PNG + HTML), other runs overlaid: `lit-open report run.dir=RUN_DIR [compare=[DIR,...]]`
  logs      replay a run's metrics.csv and events.jsonl into W&B or MLflow (each row once; e.g. after an offline run):
            `lit-open logs sync run.dir=RUN_DIR to=wandb|mlflow [mode=offline] [project=P] [tracking_uri=URI]`
  data      the samples of a global batch, and the steps that trained on a sample or a text (no log needed):
            `lit-open data show run.dir=RUN_DIR step=N [samples=4]`, `... released_step=S` (a released order)
            `lit-open data locate run.dir=RUN_DIR sample=[SOURCE,INDEX] | file=NAME index=I | contains=TEXT steps=[A,B]`
  list      `lit-open list recipes|models|plugins`

Overrides are Hydra's: key=value, +key=value (add a key), recipe=NAME, model=NAME, plugins=[a,b], +plugins=c.
Errors in your input exit with status 2 and a message; set LIT_OPEN_DEBUG=1 for a traceback.
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LIT_OPEN_DEBUG") == "1"
    if not debug:
        _quiet_warnings()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, args = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(USAGE, end="")
        sys.exit(0)
    try:
        # each command imports what it needs when it runs: --help and the errors of the others stay instant
        if command == "train":
            _train(args)
        elif command == "prepare":
            from lit_open.compose import load_command_config
            from lit_open.data.prepare import prepare

            prepare(load_command_config("prepare", args))
        elif command == "eval":
            from lit_open.commands.evaluate import eval_command

            _quiet_lightning()
            eval_command(args)
        elif command == "list":
            from lit_open.commands.listing import list_command

            list_command(args)
        elif command == "convert":
            from lit_open.commands.convert import convert_command

            convert_command(args)
        elif command == "data":
            from lit_open.commands.data import data_command

            data_command(args)
        elif command == "logs":
            from lit_open.commands.logs import logs_command

            logs_command(args)
        elif command == "report":
            from lit_open.commands.report import report_command

            report_command(args)
        else:
            raise UserError(
                f"Unknown command {command!r}. Commands: train, prepare, eval, convert, report, logs, data, list "
                "(see lit-open --help)."
            )
    except RunStopped as err:  # a stop signal or trainer.time_limit: a checkpoint was written
        print(f"lit-open: {err}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except RunInterrupted as err:  # Ctrl-C during training
        print(f"lit-open: {err}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except UserError as err:
        if debug:  # the traceback, with the exception the error was raised from; the status stays 2
            traceback.print_exc()
        print(f"lit-open: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        consequence = {
            "train": "the newest complete checkpoint is intact (resume=auto continues from it)",
            "prepare": "nothing was written (the output directory appears only once complete)",
        }.get(command, "stopped")
        print(f"lit-open: interrupted; {consequence}", file=sys.stderr)
        sys.exit(130)


def _train(args: list[str]) -> None:
    # imported when training: Lightning and torch take seconds to import
    from lit_open.compose import explicit_model_keys, load_train_config
    from lit_open.train import run

    _quiet_lightning()
    config_file = None
    if args and args[0] in ("--config", "-c"):
        if len(args) < 2:
            raise UserError("--config needs a path, e.g. --config runs/quickstart/config.yaml.")
        config_file, args = args[1], args[2:]
    run(load_train_config(args, config_file=config_file), explicit_model_keys=explicit_model_keys(args))


def _quiet_lightning() -> None:
    """Lightning's banners and tips go, its warnings stay (call after importing it: it sets INFO on import)."""
    if os.environ.get("LIT_OPEN_DEBUG") != "1":
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # torchao (float8, imported by Lightning's fit) registers an Enum with torch's pytree, which warns about it
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _quiet_warnings() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # the loader reads memory-mapped token chunks: few workers are enough, whatever Lightning's heuristic says
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


if __name__ == "__main__":
    main()
