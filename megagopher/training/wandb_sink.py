"""Weights & Biases as a further metrics sink (https://docs.wandb.ai/ref/python/): the rows of metrics.jsonl
and the resolved run config, from the rank that writes metrics, into one wandb run that a resumed training
run continues. The one home of wandb in megagopher: nothing else imports it.

wandb is an optional extra (``pip install megagopher[wandb]``), imported only when ``run.wandb_project`` is
set. Design after torchtitan's and Megatron-LM's wandb writers (one writer rank, the run config as wandb's
config, the training iteration as wandb's step), plus what they leave out: the wandb run id kept in the run
directory so a resumed run continues the same wandb run, offline unless the user is logged in, and an exit
code on finish so a crashed run shows as crashed.

Rows go in as ``train/<key>`` (every step row) and ``eval/<key>`` (every eval row) at ``step = iteration``,
the keys of metrics.jsonl under the prefixes tensorboard uses: a step row and the eval row of the same
iteration both carry ``loss``, and wandb keeps one history row per step.
"""
import importlib.util
import netrc
import os
import secrets
import string
import sys
from urllib.parse import urlparse

from megagopher.config.fields import ConfigError
from megagopher.errors import ENDING_ERRORS, InputError, exit_status
from megagopher.training.ckpt_files import write_text_durably

RUN_ID_FILE = "wandb_run_id"
INSTALL_HINT = "pip install megagopher[wandb]"


def require_wandb(run_cfg):
    """ConfigError unless wandb is importable where ``run.wandb_project`` asks for it. Looks the package up
    without importing it, so every rank can check before any collective at no cost."""
    if not run_cfg.wandb_project:
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec in sys.modules
        found = False
    if not found:
        raise ConfigError(f"run.wandb_project = {run_cfg.wandb_project!r} needs the wandb package, which is not "
                          f"installed: {INSTALL_HINT} (or set run.wandb_project = \"\")")


def logged_in(environ=None, netrc_path=None):
    """Whether wandb has an API key to upload with: WANDB_API_KEY, or a netrc entry for the wandb host
    (WANDB_BASE_URL's, default api.wandb.ai), where ``wandb login`` writes it."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = netrc_path or environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # no file, unreadable, or not netrc: not logged in
        return False
    return bool(entry and entry[2])


def resolve_mode(mode, environ=None, netrc_path=None):
    """The wandb mode of ``run.wandb_mode``: "online" and "offline" as given; "auto": an explicit WANDB_MODE,
    else online when logged in, else offline (a run never stops for a login prompt)."""
    environ = os.environ if environ is None else environ
    if mode != "auto":
        return mode
    if environ.get("WANDB_MODE", "").strip():
        return environ["WANDB_MODE"].strip()
    return "online" if logged_in(environ, netrc_path) else "offline"


def new_run_id():
    """A fresh wandb run id: 12 random base-36 characters (wandb ids are letters, digits, - and _)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))


def run_id_for(run_dir, resume_iteration, generate=new_run_id):
    """The wandb run id of this training run: the one stored in RUN_DIR/wandb_run_id when resuming
    (``resume_iteration`` > 0), else a new one from ``generate()``, stored durably before wandb sees it.
    A fresh start in a used run directory is a new wandb run, as metrics.jsonl starts over then."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if resume_iteration > 0:
        try:
            with open(path, encoding="utf-8") as f:
                stored = f.read().strip()
        except FileNotFoundError:  # wandb switched on mid-run, or a new run directory: a new wandb run
            stored = ""
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read the wandb run id to resume the wandb run ({e})") from None
        if stored:
            return stored, True
    run_id = generate()
    try:
        write_text_durably(path, run_id + "\n")
    except OSError as e:
        raise InputError(f"{path}: cannot write the wandb run id ({e.strerror})") from None
    return run_id, False


class WandbSink:
    """One wandb run fed the metrics rows. Built by MetricsLogger on its writing rank only."""

    def __init__(self, run_cfg, run_dir, config_tables, resume_iteration=0):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"run.wandb_project = {run_cfg.wandb_project!r}: cannot import wandb ({e}): "
                              f"{INSTALL_HINT}") from None
        run_id, resuming = run_id_for(run_dir, resume_iteration)
        mode = resolve_mode(run_cfg.wandb_mode)
        try:
            self.run = wandb.init(
                project=run_cfg.wandb_project, entity=run_cfg.wandb_entity or None,
                name=run_cfg.wandb_run_name or os.path.basename(os.path.abspath(run_dir)),
                id=run_id, resume="allow", mode=mode, dir=run_dir, config=config_tables,
                # The config of a resumed run may differ (more steps, another stage): it is the run's now.
                allow_val_change=True)
        except Exception as e:  # noqa: BLE001 - wandb's errors (login, network, settings) have no common base
            raise InputError(f"wandb.init (project {run_cfg.wandb_project!r}, mode {mode!r}, run id {run_id} "
                             f"in {os.path.join(run_dir, RUN_ID_FILE)}) failed: {type(e).__name__}: {e}") from None
        # An online resume starts at the step after the last one the server holds; rows below it were logged
        # before a crash (between the checkpoint resumed from and the crash) and wandb would refuse them.
        self.first_step = int(getattr(self.run, "starting_step", 0) or 0) if resuming else 0

    def log(self, prefix, row):
        """``row`` (a metrics.jsonl row) under ``prefix/`` at step = its iteration."""
        step = int(row["iteration"])
        if step < self.first_step:  # held by the wandb run already, from before a crash
            return
        self.run.log({f"{prefix}/{k}": v for k, v in row.items() if k != "event"}, step=step)

    def close(self, exit_code=None):
        """Finishes the run; exit_code None: that of the error being raised through the caller (the
        trainer closes its logger in a ``finally``), else 0, so a crashed run shows as failed."""
        if exit_code is None:
            error = sys.exc_info()[1]
            if error is None or isinstance(error, GeneratorExit):
                exit_code = 0
            else:
                exit_code = exit_status(error) if isinstance(error, ENDING_ERRORS) else 1
        self.run.finish(exit_code=exit_code)
