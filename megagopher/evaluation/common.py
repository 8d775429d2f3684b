"""What every evaluation task shares: reading JSONL examples, prompts after the end-of-document id, and
writing results (a metrics line appended and fsynced; a JSON file written whole or not at all)."""
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


def prompt_ids(tok, text, room, limit):
    """[end-of-document id] + the tokens of ``text`` (as documents start in training), keeping the end when
    it leaves less than ``room`` of the model's ``limit`` tokens for the answer."""
    ids = ([tok.eod] if tok.eod is not None else []) + tok.encode(text)
    return ids[-(limit - room):]


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
