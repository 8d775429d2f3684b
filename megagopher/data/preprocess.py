"""Documents (JSONL, Parquet, a datasets save_to_disk directory) -> tokenised MMIDIDX datasets (the engine
of tools/preprocess_data.py), laid out as Megatron-LM's tools/preprocess_data.py does.

The main process reads the inputs in bounded batches (input_formats.py) and writes the output; worker
processes parse JSON, join the text fields, check UTF-8 and tokenise with the tokenizer interface's
``encode_batch`` (the expensive part), a batch per task so inter-process traffic is a few large messages.
Each worker tokenises on one thread (TOKENIZERS_PARALLELISM=false for `tokenizers`), so ``--workers N`` means
N cores; with one worker everything runs in the calling process and the library keeps its own setting.
Batches come back in input order and at most 4 per worker are in flight, so the dataset's document order
is the inputs' order whatever the worker count and memory does not grow with the input. A document is
``[bos] if tokenizer.add_bos`` + its text's tokens + ``[eod] if append_eod``; a text with no tokens is
skipped and counted. Output goes to temporary names and is renamed only after the last document, so a
failed run never leaves a half-written dataset under the final names.

What is skipped and what stops the run: a problem with one document (a malformed JSON line, a missing key
in a JSON object, a value that is null or not a string) is reported with its line or row and skipped, or
stops the run with ``strict``; a problem with a file (no such path, unknown format, a damaged or truncated
file, a Parquet/Arrow file without the text column), text that is not valid UTF-8 (the JSON and Arrow
formats promise UTF-8, so the file is in another encoding or damaged) and an input with no document at
all always stop it (a DataError: exit status 2 in the tool).
"""
import collections
import itertools
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from .errors import DataError
from .indexed_dataset import IndexedDatasetBuilder, token_dtype_for
from .input_formats import read_batches, resolve_inputs, source_stem
from .tokenizer import load_tokenizer

FIELD_SEPARATOR = "\n\n"   # between the values of several text keys (e.g. title, text)
_worker = {}


class DocumentError(ValueError):
    """One document that cannot be used; ``fatal`` when it stops the run whatever ``strict`` says."""

    def __init__(self, message, fatal=False):
        super().__init__(message)
        self.fatal = fatal


def text_keys(json_key):
    """A key or a sequence of keys, as a tuple."""
    return (json_key,) if isinstance(json_key, str) else tuple(json_key)


def join_fields(values, keys):
    """The document text from one value per key (str, or bytes holding UTF-8), joined by FIELD_SEPARATOR."""
    parts = []
    for key, value in zip(keys, values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DocumentError(f"field {key!r} is not valid UTF-8 (byte {value[e.start]:#04x} at offset "
                                    f"{e.start})", fatal=True) from None
        if not isinstance(value, str):
            what = "null" if value is None else f"a {type(value).__name__}, not a string"
            raise DocumentError(f"field {key!r} is {what}")
        parts.append(value)
    return parts[0] if len(parts) == 1 else FIELD_SEPARATOR.join(parts)


def parse_document(line, json_key):
    """The text of one JSONL line (bytes or str) under ``json_key`` (a key, or several joined by
    FIELD_SEPARATOR); DocumentError (a ValueError) with a short reason when the line is malformed."""
    keys = text_keys(json_key)
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DocumentError(f"not valid UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})",
                                fatal=True) from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DocumentError(f"not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DocumentError(f"expected a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise DocumentError(f"no {key!r} field (fields: {sorted(row)[:8]})")
    values = [row[k] for k in keys]
    for key, value in zip(keys, values):
        if not isinstance(value, str):   # a JSON string is never bytes; null and numbers are malformed
            raise DocumentError(f"field {key!r} is a {type(value).__name__}, not a string")
    return join_fields(values, keys)


def _init_worker(tokenizer_dir, tokenizer_kind, keys, append_eod, dtype, tokenizer=None):
    """Set up tokenising in this process: a pool worker loads its own tokenizer (and runs it on one thread:
    --workers counts cores, and N processes each running a pool of all cores would oversubscribe the
    machine); the calling process (one worker) passes the one it loaded."""
    if tokenizer is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = tokenizer or load_tokenizer(tokenizer_dir, tokenizer_kind)
    _worker.update(tokenizer=tok, keys=keys, dtype=np.dtype(dtype), prefix=[tok.bos] if tok.add_bos else [],
                   suffix=[tok.eod] if append_eod else [])


def _encode_batch(batch):
    """A Batch -> (the batch without its items, [(location, token array | None, error | None, fatal)],
    UTF-8 bytes of the texts)."""
    keys, out, texts, slots, nbytes = _worker["keys"], [], [], [], 0
    for location, payload in batch.items:
        try:
            text = parse_document(payload, keys) if batch.kind == "jsonl" else join_fields(payload, keys)
            try:
                nbytes += len(text.encode("utf-8"))
            except UnicodeEncodeError as e:   # a lone surrogate, e.g. "\ud800" escaped in the JSON
                raise DocumentError(f"not valid UTF-8 (lone surrogate {text[e.start]!r} at character "
                                    f"{e.start})", fatal=True) from None
        except DocumentError as e:
            out.append((location, None, str(e), e.fatal))
            continue
        slots.append(len(out))
        out.append(None)
        texts.append(text)
    prefix, suffix, dtype = _worker["prefix"], _worker["suffix"], _worker["dtype"]
    for slot, ids in zip(slots, _worker["tokenizer"].encode_batch(texts) if texts else []):
        tokens = np.fromiter(itertools.chain(prefix, ids, suffix), dtype, len(prefix) + len(ids) + len(suffix))
        # A text with no tokens is an empty document, whatever bos/eod would surround it.
        out[slot] = (batch.items[slot][0], tokens if ids else tokens[:0], None, False)
    return batch._replace(items=None), out, nbytes


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


def output_plan(sources, output_prefix, keys, per_input):
    """[(dataset prefix, its sources)]: all sources into PREFIX_<keys>_document, or one dataset per source
    named PREFIX_<input stem>_<keys>_document (keys joined by "_")."""
    name = "_".join(keys)
    if not per_input:
        return [(f"{output_prefix}_{name}_document", sources)]
    sep = "" if output_prefix.endswith(("/", os.sep)) else "_"
    plan, seen = [], {}
    for source in sources:
        prefix = f"{output_prefix}{sep}{source_stem(source)}_{name}_document"
        if prefix in seen:
            raise DataError(f"--output-per-input: {seen[prefix]} and {source.path} would both write {prefix}; "
                            f"give inputs with different names")
        seen[prefix] = source.path
        plan.append((prefix, [source]))
    return plan


def _tagged_batches(sources, keys, batch_docs, base):
    """The batches of ``sources`` in order, done_bytes counted over all inputs (``base``: bytes before them)."""
    for source in sources:
        for batch in read_batches(source, keys, batch_docs):
            yield batch if batch.done_bytes is None else batch._replace(done_bytes=base + batch.done_bytes)
        base += source.size


class _Run:
    """Counters, the progress line's clock and the skip/strict policy for one preprocess() call."""

    def __init__(self, total_bytes, workers, strict, log_interval, log):
        self.stats = {"documents": 0, "skipped": 0, "empty": 0, "tokens": 0, "bytes": 0, "text_bytes": 0,
                      "total_bytes": total_bytes}
        self.workers, self.strict, self.log_interval, self.log = workers, strict, log_interval, log
        self.start = self.last_log = time.perf_counter()

    def problem(self, batch, location, error, fatal):
        jsonl = batch.kind == "jsonl"
        where = f"{batch.path}:{location}" if jsonl else f"{batch.path}: row {location}"
        if fatal:
            raise DataError(f"{where}: {error}")
        message = f"{where}: {'malformed line' if jsonl else 'malformed document'}: {error}"
        if self.strict:
            raise DataError(message + " (stopping: --strict)")
        self.stats["skipped"] += 1
        if self.stats["skipped"] <= 20:
            print(message + " (skipped)", file=self.log)
        elif self.stats["skipped"] == 21:
            print("further malformed documents are counted, not printed", file=self.log)

    def tick(self):
        now = time.perf_counter()
        if self.log_interval and now - self.last_log >= self.log_interval:
            self.last_log = now
            print(progress_line(self.stats, now - self.start, self.workers), file=self.log, flush=True)


def _write_dataset(prefix, sources, results_of, run, dtype, base):
    """Tokenise ``sources`` into ``prefix``.bin/.idx; nothing under the final names unless it completes."""
    builder = IndexedDatasetBuilder(prefix, dtype)
    mine = dict.fromkeys(("documents", "skipped", "empty", "tokens"), 0)
    before = {k: run.stats[k] for k in mine}
    try:
        for batch, out, nbytes in results_of(sources, base):
            for location, ids, error, fatal in out:
                if error is not None:
                    run.problem(batch, location, error, fatal)
                elif len(ids) == 0:
                    run.stats["empty"] += 1
                else:
                    builder.add_document(ids)
                    run.stats["documents"] += 1
                    run.stats["tokens"] += len(ids)
            run.stats["text_bytes"] += nbytes
            if batch.done_bytes is not None:
                run.stats["bytes"] = batch.done_bytes
            run.tick()
        mine = {k: run.stats[k] - before[k] for k in mine}
        if mine["documents"] == 0:
            raise DataError(f"no documents in {', '.join(s.path for s in sources)}: {mine['skipped']} malformed, "
                            f"{mine['empty']} empty after tokenisation; nothing written to {prefix}")
        builder.finalize()
    except BaseException:
        builder.abort()   # leave nothing under the final names, and no temporary files either
        raise
    return dict(mine, prefix=prefix)


def preprocess(inputs, tokenizer_dir, output_prefix, json_key="text", workers=1, append_eod=False,
               strict=False, log_interval=5.0, batch_docs=256, log=None, tokenizer_kind=None,
               output_per_input=False):
    """Tokenise ``inputs`` (a path, directory or glob, or a list of them) into
    ``{output_prefix}_{key}_document.bin/.idx`` (``json_key``: a key or a list of keys whose values are
    joined by FIELD_SEPARATOR, named joined by "_"), or one dataset per input file with
    ``output_per_input``. Progress and skipped documents are reported on ``log`` (default: sys.stderr).
    Raises DataError (a ValueError) for bad input, TokenizerError for a bad tokenizer.
    Returns statistics: documents, skipped, empty, tokens, bytes (of input files read), text_bytes,
    total_bytes, seconds, outputs (per dataset: prefix and its counts) and prefix (the first dataset's)."""
    keys = text_keys(json_key)
    sources = resolve_inputs([os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else
                             [os.fspath(i) for i in inputs])
    tokenizer = load_tokenizer(tokenizer_dir, tokenizer_kind)
    if append_eod and tokenizer.eod is None:
        raise DataError(f"--append-eod: the {tokenizer.kind} tokenizer in {tokenizer_dir} has no end-of-document "
                        f"token")
    dtype = token_dtype_for(tokenizer.vocab_size)
    plan = output_plan(sources, output_prefix, keys, output_per_input)
    run = _Run(sum(s.size for s in sources), workers, strict, log_interval, log or sys.stderr)
    init, pool = (tokenizer_dir, tokenizer_kind, keys, append_eod, dtype), None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
                workers, _init_worker, init)

            def results_of(group, base):
                return ordered_map(pool, _encode_batch, _tagged_batches(group, keys, batch_docs, base), 4 * workers)
        else:
            _init_worker(*init, tokenizer)

            def results_of(group, base):
                return map(_encode_batch, _tagged_batches(group, keys, batch_docs, base))
        outputs, base = [], 0
        for prefix, group in plan:
            outputs.append(_write_dataset(prefix, group, results_of, run, dtype, base))
            base += sum(s.size for s in group)
    finally:
        _worker.clear()
        if pool is not None:
            pool.terminate()
            pool.join()
    return dict(run.stats, seconds=time.perf_counter() - run.start, outputs=outputs, prefix=outputs[0]["prefix"])


def progress_line(stats, seconds, workers):
    """documents/s, MB/s of text, tokens so far and the ETA. ETA basis: the share of the inputs' on-disk
    bytes read so far (JSONL: the file position, compressed for .gz/.zst; Parquet: each file's size in
    proportion to the rows read, from its metadata; Arrow: the memory map's position)."""
    seconds = max(seconds, 1e-9)
    mb = stats["text_bytes"] / 1e6
    done, total = stats["bytes"], stats.get("total_bytes", 0)
    eta = (f"{seconds * (total - done) / done:.0f} s" if 0 < done < total else "-") if total else "-"
    share = f"{100 * done / total:.0f}%" if total else "-"
    return (f"processed {stats['documents']} documents, {stats['tokens']} tokens, {mb:.1f} MB of text in "
            f"{seconds:.1f} s: {stats['documents'] / seconds:.0f} docs/s, {mb / seconds:.2f} MB/s "
            f"({mb / seconds / workers:.2f} MB/s per worker), {stats['tokens'] / seconds:.0f} tokens/s; "
            f"input {share} read, ETA {eta}")
