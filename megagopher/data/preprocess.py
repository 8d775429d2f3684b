"""JSONL documents -> tokenised MMIDIDX dataset (the engine of tools/preprocess_data.py).

The main process reads raw lines and writes the output; worker processes parse the JSON and tokenise
(the expensive part), in batches of lines so inter-process traffic is a few large messages. Batches come
back in input order, so the dataset's document order is the file's line order whatever the
worker count. Output goes to temporary names and is renamed only after the last document, so an
interrupted run never leaves a half-written dataset under the final names.
"""
import collections
import json
import multiprocessing
import sys
import time

import numpy as np

from .indexed_dataset import IndexedDatasetBuilder, token_dtype_for
from .tokenizer import load_tokenizer

_worker = {}


def parse_document(line, json_key):
    """The text of one JSONL line; ValueError with a short reason when the line is malformed."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if json_key not in row:
        raise ValueError(f"no {json_key!r} field (fields: {sorted(row)[:8]})")
    text = row[json_key]
    if not isinstance(text, str):
        raise ValueError(f"field {json_key!r} is a {type(text).__name__}, not a string")
    return text


def _init_worker(tokenizer_dir, json_key, append_eod, dtype):
    _worker.update(tokenizer=load_tokenizer(tokenizer_dir), json_key=json_key, append_eod=append_eod,
                   dtype=dtype)


def _encode_batch(batch):
    """[(line_no, raw line)] -> [(line_no, token array or None, error or None)]."""
    tok, key = _worker["tokenizer"], _worker["json_key"]
    out = []
    for line_no, line in batch:
        try:
            text = parse_document(line, key)
        except ValueError as e:
            out.append((line_no, None, str(e)))
            continue
        ids = tok.encode(text)
        if _worker["append_eod"]:
            ids.append(tok.eod)
        out.append((line_no, np.asarray(ids, dtype=_worker["dtype"]), None))
    return out


def ordered_map(pool, func, items, max_pending):
    """Like pool.imap (results in input order), but with at most ``max_pending`` items in flight: imap
    reads its whole input ahead into memory, which a many-GB corpus cannot afford."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _batches(path, batch_lines, counter, batch_bytes=1 << 18):
    """Batches of (line_no, raw line): at most batch_lines lines or about batch_bytes bytes, so both
    short and very long documents give tasks of a size that balances across workers."""
    with open(path, "rb") as f:
        batch, nbytes = [], 0
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue   # blank lines (e.g. a trailing newline) are not documents
            batch.append((line_no, line))
            nbytes += len(line)
            if len(batch) == batch_lines or nbytes >= batch_bytes:
                counter.append(nbytes)
                yield batch
                batch, nbytes = [], 0
        if batch:
            counter.append(nbytes)
            yield batch


def preprocess(input_path, tokenizer_dir, output_prefix, json_key="text", workers=1, append_eod=False,
               strict=False, log_interval=5.0, batch_lines=256, log=sys.stderr):
    """Tokenise ``input_path`` into ``{output_prefix}_{json_key}_document.bin/.idx``. Malformed lines are
    reported with their line number and skipped (``strict=False``) or raise ValueError. Returns a dict of
    statistics (documents, skipped, empty, tokens, bytes, seconds, prefix)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype_for(tokenizer.vocab_size)
    prefix = f"{output_prefix}_{json_key}_document"
    builder = IndexedDatasetBuilder(prefix, dtype)
    stats = {"documents": 0, "skipped": 0, "empty": 0, "tokens": 0, "bytes": 0, "prefix": prefix}
    read_bytes = []   # bytes per batch, in order, appended by the reader generator
    start = last_log = time.perf_counter()
    init = (tokenizer_dir, json_key, append_eod, dtype)
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
                workers, _init_worker, init)
            results = ordered_map(pool, _encode_batch, _batches(input_path, batch_lines, read_bytes), 4 * workers)
        else:
            _init_worker(*init)
            results = map(_encode_batch, _batches(input_path, batch_lines, read_bytes))
        for batch_no, batch in enumerate(results):
            stats["bytes"] += read_bytes[batch_no]
            for line_no, ids, error in batch:
                if error is not None:
                    message = f"{input_path}:{line_no}: malformed line: {error}"
                    if strict:
                        raise ValueError(message + " (stopping: --strict)")
                    stats["skipped"] += 1
                    if stats["skipped"] <= 20:
                        print(message + " (skipped)", file=log)
                    elif stats["skipped"] == 21:
                        print("further malformed lines are counted, not printed", file=log)
                    continue
                if len(ids) == 0:
                    stats["empty"] += 1   # an empty text without --append-eod: nothing to store
                    continue
                builder.add_document(ids)
                stats["documents"] += 1
                stats["tokens"] += len(ids)
            now = time.perf_counter()
            if log_interval and now - last_log >= log_interval:
                last_log = now
                print(progress_line(stats, now - start, workers), file=log, flush=True)
        builder.finalize()
    except BaseException:
        builder.abort()   # leave nothing under the final names, and no temporary files either
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    stats["seconds"] = time.perf_counter() - start
    return stats


def progress_line(stats, seconds, workers):
    seconds = max(seconds, 1e-9)
    mb = stats["bytes"] / 1e6
    return (f"processed {stats['documents']} documents ({mb:.1f} MB) in {seconds:.1f} s: "
            f"{stats['documents'] / seconds:.0f} docs/s, {mb / seconds:.2f} MB/s "
            f"({mb / seconds / workers:.2f} MB/s per worker)")
