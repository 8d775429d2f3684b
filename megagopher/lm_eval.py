"""lm-evaluation-harness's own command line, with the megagopher model registered first.

    python -m megagopher.lm_eval --model megagopher --model_args checkpoint=DIR,batch_size=16 \\
           --tasks openbookqa [--include_path TASK_DIR] [--output_path OUT] [--log_samples] [--limit N]
    torchrun --nproc-per-node 2 -m megagopher.lm_eval --model megagopher --model_args checkpoint=DIR,tp=2 ...

Every argument is lm_eval's (``lm-eval run --help``; the subcommands ``ls`` and ``validate`` work too): this
module imports megagopher.evaluation.lm_eval_adapter, which registers the model "megagopher" in lm_eval's
model registry, then hands the command line to lm_eval's CLI entry (lm_eval.__main__.cli_evaluate). The
plain ``lm_eval`` command cannot find the model: lm_eval 0.4 fills its registry from its own table of
models and reads no plugin entry points. model_args: megagopher/evaluation/lm_eval_adapter.py.

lm_eval is an optional extra (``pip install megagopher[eval]``); without it, or with bad model_args (a
missing checkpoint, an unknown key or value), this prints one ``error:`` line and exits with status 2.
"""
import sys

from megagopher.errors import EXIT_INPUT_ERROR


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        import megagopher.evaluation.lm_eval_adapter  # noqa: F401  registers "megagopher" with lm_eval
    except ImportError as e:
        print(f"megagopher.lm_eval: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    from lm_eval.__main__ import cli_evaluate

    from megagopher import parallel_state as ps
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm_eval's parser reads sys.argv itself (to insert "run" when it is left out)
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as e:
        print(f"megagopher.lm_eval: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    finally:
        sys.argv = saved
        ps.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
