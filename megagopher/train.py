"""Entry point: ``python -m megagopher.train --config FILE.toml [--section.key=value ...]``, alone or under
torchrun (docs/ARCHITECTURE.md 4.1). A bad config exits with status 2 and one line naming the problem, on
every rank, before any process communicates. ``--help-config`` prints every key with its default, choices
and doc. A run that loses a rank, its launcher or its rendezvous store exits with status 5 and one line
naming what was lost (training/watchdog.py), instead of a traceback from every rank."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m megagopher.train",
        description="Megatron-style 3D-parallel pretraining. Overrides: --section.key=value or --section.key value "
                    "(TOML literals take their type).")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--help-config", action="store_true", help="print every config key and exit")
    args, rest = parser.parse_known_args(argv)
    if args.help_config:
        from megagopher.config.reference import help_text
        sys.stdout.write(help_text())
        return 0
    from megagopher.errors import EXIT_INPUT_ERROR, InputError
    from megagopher.config import ConfigError, load_config, parse_overrides
    from megagopher.training.distributed import exit_if_peer_lost, stop_watchdog
    try:
        cfg = load_config(args.config, parse_overrides(rest))
        from megagopher.training.loop import Trainer
        trainer = Trainer(cfg)  # validates the config for this world size before any collective
    except ConfigError as e:
        print(f"megagopher.train: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    except InputError as e:  # a data or tokenizer file named by the config
        stop_watchdog()  # every rank reads the same files, so every rank ends here
        print(f"megagopher.train: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    except RuntimeError as e:
        exit_if_peer_lost(e)
        raise
    try:
        return _run(trainer)
    except RuntimeError as e:  # from a collective, the run's or the final barrier's, when a peer is gone
        exit_if_peer_lost(e)
        raise


def _run(trainer):
    """Trains, then ends the run's communication in order; the exit status."""
    from megagopher.errors import ENDING_ERRORS, exit_status
    from megagopher.training.distributed import end_distributed
    status = 0
    # NonFiniteLoss and SaveFailed are agreed by every rank (one all-reduce), and every rank reads the same
    # data files (InputError), so every rank is here: the run ends in order with the outcome's status.
    try:
        trainer.run()
    except ENDING_ERRORS as e:
        print(f"megagopher.train: {e}", file=sys.stderr, flush=True)
        status = exit_status(e)
    end_distributed(trainer.close)  # the watchdog stops before the groups are destroyed
    return status


if __name__ == "__main__":
    sys.exit(main())
