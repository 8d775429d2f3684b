"""The typed config: every key documented and listed by --help-config, and every validation rule firing
the same message on every rank of a 4-rank run before any collective (invariant 6), table-driven."""
import contextlib
import inspect
import io
import os
import re
import subprocess
import sys

import torch.distributed as dist

from megagopher.config import SECTIONS, StageConfig
from megagopher.config.fields import field_map
from megagopher.testing import spawn
from train_utils import ROOT, TINY

STAGED = TINY + """
[[stages]]
name = "short"
train_iters = 2
[[stages]]
name = "deep"
train_iters = 2
grow.num_layers = 6
"""

# (name, config text, overrides, text the error must contain). World size 4; TINY has 4 layers, 4 heads,
# 2 query groups, micro-batch 2 of global batch 8, sequence 16.
RULES = [
    ("unknown key", TINY, ["--model.hidden_sizes=32"], "unknown key model.hidden_sizes; valid keys of [model]"),
    ("choice", TINY, ["--parallel.schedule=zigzag"], "parallel.schedule = 'zigzag'; valid: 'gpipe', '1f1b'"),
    ("stage steps", STAGED, ["--stages.deep.training.train_iters=9"],
     "stages[1].training.train_iters: a stage's number of steps is stages[1].train_iters"),
    ("load path", TINY, ["--checkpoint.load=/nonexistent/ckpt"], "checkpoint.load = '/nonexistent/ckpt': no "
     "checkpoint there"),
    ("compile and recompute", TINY, ["--training.compile=true", "--training.recompute=full"],
     "training.compile = true needs training.recompute = 'none' (got 'full')"),
    ("compile and zb-h1", TINY, ["--training.compile=true", "--parallel.pp=2", "--parallel.schedule=zb-h1"],
     "training.compile = true does not compose with parallel.schedule = 'zb-h1'"),
    ("save error policy", TINY, ["--checkpoint.on_save_error=retry"],
     "checkpoint.on_save_error = 'retry'; valid: 'stop', 'continue'"),
    ("activation", TINY, ["--model.activation=gelu_new"],
     "model.activation = 'gelu_new'; valid: 'gelu', 'gelu_exact', 'swiglu'"),
    ("output bias type", TINY, ["--model.output_bias=1"], "model.output_bias = 1 must be true or false"),
    ("type", TINY, ["--training.micro_batch_size=two"], "training.micro_batch_size = 'two' must be an integer"),
    ("range", TINY, ["--training.micro_batch_size=0"], "training.micro_batch_size = 0 must be >= 1"),
    ("optimizer range", TINY, ["--optimizer.beta2=1.5"], "optimizer.beta2 = 1.5 must be in [0, 1)"),
    ("bucket size", TINY, ["--parallel.bucket_size_mb=-1"], "parallel.bucket_size_mb = -1.0 must be >= 0"),
    ("hysteresis", TINY, ["--training.hysteresis=0"], "training.hysteresis = 0 must be >= 1"),
    ("z-loss range", TINY, ["--training.z_loss=-0.001"], "training.z_loss = -0.001 must be a finite number >= 0"),
    ("z-loss finite", TINY, ["--training.z_loss=inf"], "training.z_loss = inf must be a finite number >= 0"),
    ("world size", TINY, ["--parallel.tp=3"], "world size 4 is not divisible by parallel.tp * parallel.cp"),
    ("dp", TINY, ["--parallel.dp=3"], "parallel.dp = 3 but world size 4"),
    ("query groups", TINY, ["--parallel.tp=4"], "model.num_query_groups = 2 is not divisible by parallel.tp = 4"),
    ("model shape", TINY, ["--model.hidden_size=30"], "model.hidden_size = 30 is not divisible by"),
    ("layers", TINY, ["--parallel.pp=2", "--model.num_layers=3"],
     "model.num_layers = 3 is not divisible by parallel.pp * parallel.vpp = 2 * 1 = 2"),
    ("vpp without pp", TINY, ["--parallel.vpp=2"], "parallel.vpp = 2 needs parallel.pp > 1"),
    ("pp_layers sum", TINY, ["--parallel.pp=2", "--parallel.pp_layers=[1, 2]"],
     "parallel.pp_layers = [1, 2] sums to 3, but model.num_layers = 4"),
    ("pp_layers sign", TINY, ["--parallel.pp=2", "--parallel.pp_layers=[-1, 5]"],
     "parallel.pp_layers = [-1, 5] must be non-negative integers"),
    ("pp_layers empty middle", TINY, ["--parallel.pp=4", "--parallel.pp_layers=[2, 0, 1, 1]"],
     "leaves virtual stage 1 without layers"),
    ("pp_layers at a grown depth", STAGED, ["--parallel.pp=2", "--parallel.pp_layers=[1, 3]",
                                            "--stages.deep.grow.num_layers=5"],
     "model.num_layers = 5 is not divisible by parallel.pp * parallel.vpp = 2 * 1 = 2; set parallel.pp_layers "
     "for an uneven split (stage 'deep')"),
    ("batch", TINY, ["--training.global_batch_size=6"],
     "training.global_batch_size = 6 is not divisible by training.micro_batch_size * dp = 8"),
    ("sequence parallel", TINY, ["--parallel.tp=2", "--parallel.sp=true", "--model.seq_length=15"],
     "model.seq_length = 15 is not divisible by parallel.tp = 2"),
    ("context parallel chunks", TINY, ["--parallel.cp=2", "--model.seq_length=18"],
     "model.seq_length = 18 is not divisible by 2 * parallel.cp = 4"),
    ("context and sequence parallel", TINY, ["--parallel.cp=2", "--parallel.tp=2", "--parallel.sp=true",
                                             "--model.seq_length=20"],
     "model.seq_length = 20 is not divisible by parallel.tp * 2 * parallel.cp = 8"),
    ("schedule chunks", TINY, ["--parallel.pp=2", "--parallel.vpp=2", "--parallel.schedule=1f1b"],
     "parallel.schedule = '1f1b' runs one model chunk per rank"),
    ("interleaved micro-batches", TINY, ["--parallel.pp=4", "--parallel.vpp=2", "--model.num_layers=8",
                                         "--parallel.schedule=interleaved", "--training.global_batch_size=4"],
     "needs at least parallel.pp = 4 micro-batches per step, got 2"),
    ("ramp-up", TINY, ["--parallel.tp=4", "--model.num_query_groups=4", "--training.rampup_batch_size=[2, 3, 16]"],
     "training.rampup_batch_size = [2, 3, 16] passes through global batch size 5"),
    ("ramp-up shape", TINY, ["--training.rampup_batch_size=[4, 4]"], "must be [start, increment, samples]"),
    ("learning rates", TINY, ["--optimizer.min_lr=0.1"], "optimizer.min_lr = 0.1 is larger than optimizer.lr"),
    ("loss scales", TINY, ["--training.precision=fp16", "--training.min_loss_scale=1e6"],
     "training.min_loss_scale = 1000000.0 exceeds training.initial_loss_scale"),
    ("positions", TINY, ["--model.position_embedding=learned", "--model.max_position_embeddings=8"],
     "model.seq_length = 16 exceeds model.max_position_embeddings = 8"),
    ("context parallel attention", TINY, ["--parallel.cp=2", "--model.core_attention=unfused"],
     "parallel.cp = 2 needs model.core_attention = 'flash'"),
    ("context parallel compile", TINY, ["--parallel.cp=2", "--training.compile=true"],
     "parallel.cp = 2 does not compose with training.compile = true"),
    ("device", TINY, ["--training.device=cuda"], "training.device = 'cuda' but no CUDA device is available"),
    ("indexed data", TINY, ["--data.source=indexed"], "data.source = 'indexed' needs data.blend"),
    ("tokenizer", TINY, ["--data.source=indexed", '--data.blend=[[1.0, "x"]]', "--data.tokenizer_dir=/nonexistent"],
     "data.tokenizer_dir = '/nonexistent' is not a directory (it must hold a tokenizer"),
    ("tokenizer kind", TINY, ["--data.tokenizer_kind=llama"], "data.tokenizer_kind = 'llama'; valid: ''"),
    ("stage key", STAGED, ["--stages.short.model.hidden_size=8"], "may override only model.seq_length"),
    ("stage name", STAGED, ["--stages.long.train_iters=1"], "NAME one of ['short', 'deep']"),
    ("stage override", STAGED, ["--stages.short.optimizer.lrr=1.0"], "unknown key optimizer.lrr"),
    ("moe top-k", TINY, ["--model.num_experts=2", "--model.moe_top_k=3"],
     "model.moe_top_k = 3 exceeds model.num_experts = 2"),
    ("moe shared experts", TINY, ["--model.moe_shared_experts=1"],
     "model.moe_shared_experts = 1 needs routed experts (model.num_experts > 0)"),
    ("moe router", TINY, ["--model.moe_router=relu"], "model.moe_router = 'relu'; valid: 'softmax', 'sigmoid'"),
    ("moe capacity", TINY, ["--model.moe_capacity_factor=-1"], "model.moe_capacity_factor = -1.0 must be >= 0"),
    ("moe layer frequency", TINY, ["--model.moe_layer_freq=0"], "model.moe_layer_freq = 0 must be a positive integer"),
    ("upcycling top-k", STAGED, ["--stages.deep.grow.num_experts=1"],
     "stages[1].grow.num_experts = 1 is below model.moe_top_k = 2"),
    ("upcycling twice", STAGED, ["--model.num_experts=2", "--stages.deep.grow.num_experts=4"],
     "stages[1].grow.num_experts = 4: the model already has 2 experts"),
    ("upcycling expert width", STAGED, ["--stages.deep.grow.num_experts=4", "--model.moe_ffn_hidden_size=16"],
     "model.moe_ffn_hidden_size = 16 must be model.ffn_hidden_size = 128 (or 0)"),
    ("moe depth growth", STAGED, ["--model.num_experts=4", "--model.moe_layer_freq=3"],
     "grow from a multiple of 3 layers"),
    ("grow key", STAGED, ["--stages.deep.grow.width=2"], "valid keys: num_layers, num_experts"),
]
# Every function of torch.distributed that talks to other ranks (group set-up, collectives, object
# collectives, point-to-point): a rule that fires after any of them fails the test below.
COLLECTIVES = ("init_process_group", "new_group", "new_subgroups", "barrier", "monitored_barrier",
               "broadcast", "broadcast_object_list", "all_reduce", "all_reduce_coalesced", "reduce",
               "all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "gather_object",
               "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list",
               "recv_object_list")
# What megagopher calls on torch.distributed without talking to other ranks.
LOCAL_CALLS = {"get_rank", "get_world_size", "is_initialized", "is_available", "get_backend",
               "get_process_group_ranks", "destroy_process_group"}


def _refuse(name):
    def refused(*args, **kwargs):
        raise AssertionError(f"torch.distributed.{name} called before the config was rejected")
    return refused


def _run_rules(rank, world, tmp):
    """Each rule through the real entry point on every rank, with every collective refused."""
    from megagopher import train
    saved = {name: getattr(dist, name) for name in COLLECTIVES}
    results = []
    try:
        for name in COLLECTIVES:
            setattr(dist, name, _refuse(name))
        for index, (_, text, overrides, _) in enumerate(RULES):
            path = os.path.join(tmp, f"rule{index}_rank{rank}.toml")
            with open(path, "w") as f:
                f.write(text)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    status = train.main(["--config", path, f"--run.dir={tmp}/run{rank}", *overrides])
                except AssertionError as e:  # a collective was reached: the rule did not fire
                    status = f"no verdict: {e}"
            results.append((status, err.getvalue().strip()))
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    return everyone


def test_every_rule_fires_the_same_message_on_every_rank(tmp_path):
    everyone = spawn(_run_rules, 4, str(tmp_path))[0]
    for index, (name, _, overrides, expected) in enumerate(RULES):
        verdicts = {tuple(ranks[index]) for ranks in everyone}
        assert len(verdicts) == 1, f"{name}: ranks disagree: {verdicts}"
        status, message = verdicts.pop()
        assert status == 2, f"{name} ({overrides}): exit {status!r}, {message}"
        assert message.startswith("megagopher.train: config error: ") and expected in message, (name, message)


def test_the_refused_list_covers_every_call_megagopher_makes():
    """A collective the library starts using joins COLLECTIVES (or LOCAL_CALLS), so the test above refuses it."""
    called = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "megagopher")):
        for name in files:
            if name.endswith(".py"):
                called |= set(re.findall(r"\bdist\.([a-z_]+)\b", open(os.path.join(folder, name)).read()))
    functions = {name for name in called if inspect.isfunction(getattr(dist, name, None))}  # not dist.group
    assert {"all_reduce", "all_gather_into_tensor", "all_to_all_single", "isend"} <= functions  # the scan works
    assert functions - set(COLLECTIVES) - LOCAL_CALLS == set()
    assert all(callable(getattr(dist, name)) for name in COLLECTIVES)


def test_help_config_lists_every_key_with_a_doc():
    out = subprocess.run([sys.executable, "-m", "megagopher.train", "--help-config"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    sections = dict(SECTIONS, stages=StageConfig)
    lines = out.splitlines()
    for section, cls in sections.items():
        header = "[[stages]]" if section == "stages" else f"[{section}]"
        start = lines.index(header)
        block = lines[start + 1:]
        for key, f in field_map(cls).items():
            assert f.metadata.get("doc"), f"{section}.{key} has no doc"
            row = next(i for i, line in enumerate(block) if line.startswith(f"  {key} = "))
            assert block[row + 1].strip() == f.metadata["doc"], f"{section}.{key}"
            if f.metadata.get("choices"):
                assert "one of: " in block[row], f"{section}.{key} lists no choices"


def test_checkpoint_metadata_round_trip_and_format_1(tmp_path):
    """The config a checkpoint stores (JSON of to_tables) reads back equal; format 1's stage overrides
    ([section, key, value] triples) still read."""
    import json

    from megagopher.config import from_tables, load_config, to_tables
    from megagopher.export.loading import run_config
    path = tmp_path / "staged.toml"
    path.write_text(STAGED + "optimizer.lr = 1e-3\nmodel.seq_length = 32\n")
    cfg = load_config(str(path))
    assert from_tables(json.loads(json.dumps(to_tables(cfg)))) == cfg

    class Reader:
        meta = {"format_version": 1, "config": {**{k: v for k, v in to_tables(cfg).items() if k != "stages"},
                                                "stages": [{"name": "short", "train_iters": 2, "overrides": []},
                                                           {"name": "deep", "train_iters": 2,
                                                            "grow": {"num_layers": 6},
                                                            "overrides": [["optimizer", "lr", 1e-3],
                                                                          ["model", "seq_length", 32]]}]}}
    assert run_config(Reader()) == cfg


def test_resume_after_growth_with_pp_layers(tmp_path):
    """parallel.pp_layers places the configured depth only: resuming a grown model (split evenly) must not
    apply it, in the model build nor in the memory line (which once raised on rank 0 alone and left the
    other ranks waiting)."""
    from train_utils import read_metrics, run_train, write_config
    text = STAGED.replace("num_layers = 4", "num_layers = 4", 1).replace("grow.num_layers = 6", "grow.num_layers = 8")
    cfg = write_config(tmp_path, text)
    args = ("--parallel.pp=2", "--parallel.pp_layers=[1, 3]", f"--checkpoint.dir={tmp_path / 'ckpt'}",
            "--checkpoint.load=auto", "--checkpoint.save_interval=1")
    run_dir = str(tmp_path / "run")
    run_train(cfg, run_dir, *args, "--training.exit_after_iters=3", nproc=2, timeout=240)
    proc = run_train(cfg, run_dir, *args, nproc=2, timeout=240)
    assert "resumed from" in proc.stdout and "memory per rank" in proc.stdout
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
