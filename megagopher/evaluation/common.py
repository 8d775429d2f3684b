"""What every evaluation task shares: reading JSONL examples, prompts after the tokenizer's document prefix,
batching a task's model calls, and writing results (a metrics line appended and fsynced; a JSON file
written whole or not at all).

Batching: a task's model callable (``complete(prompt)``, ``loglik(context, continuation)``...) handles one
item; the model's own carries a ``batch`` attribute taking every item at once (megagopher.generate's
generate_batch / score_batch underneath, with a progress line), which ``call_batch`` prefers. A plain
function (a test's fixed answers) is called item by item."""
import json
import os
import tempfile


def read_jsonl(path, limit=None):
    """The JSON objects of ``path``, one a line (blank lines skipped), the first ``limit`` only if given."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def read_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None


def document_prefix(tok):
    """What precedes a document's tokens in training, so every prompt and scored context starts with it:
    the tokenizer's ``document_prefix`` ([bos] when it adds BOS, else [eod], else [])."""
    return list(tok.document_prefix)


def prompt_ids(tok, text, room, limit):
    """The document prefix + the tokens of ``text`` (as documents start in training), keeping the end when
    it leaves less than ``room`` of the model's ``limit`` tokens for the answer."""
    ids = document_prefix(tok) + tok.encode(text)
    return ids[-(limit - room):]


def with_batch(one, batch):
    """``one`` (the per-item callable) with ``batch`` (a list of argument tuples -> a list of results)."""
    one.batch = batch
    return one


def call_batch(fn, items):
    """[fn(*item) for item in items], through ``fn.batch`` when it has one."""
    items = list(items)
    if hasattr(fn, "batch"):
        return list(fn.batch(items))
    return [fn(*item) for item in items]


def check_batch_size(batch_size):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r} must be a positive integer")
    return batch_size


def progress_line(task, total, unit="examples"):
    """The progress line (megagopher.generation.progress) of a task's model calls."""
    from megagopher.generation.progress import Progress
    return Progress(total, f"megagopher.evaluate: {task}", unit)


def append_metrics(path, record):
    """Appends one JSON line to ``path`` and flushes it to disk."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path, obj):
    """Writes ``obj`` as JSON to a temporary file beside ``path``, fsyncs it and renames it into place, so
    a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
