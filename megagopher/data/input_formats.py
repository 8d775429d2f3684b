"""Documents from the formats pretraining corpora ship in: JSONL (plain, .gz, .zst), Parquet and a Hugging Face
``datasets`` directory written by ``save_to_disk``, read in bounded batches (tools/preprocess_data.py).

Every format is read through a well-kept library and never whole: JSONL line by line (``gzip`` for .gz,
pyarrow's ``CompressedInputStream(..., "zstd")`` for .zst, so zstd needs no extra package); Parquet with
``pyarrow.parquet.ParquetFile.iter_batches`` over one row group at a time and only the text columns, so memory
follows the row-group size, not the file size (as torchtitan and nanotron read FineWeb); a
``save_to_disk`` directory as the Arrow IPC stream files its state.json lists (the layout ``datasets`` writes
and reads back with ``Dataset.load_from_disk``), memory-mapped through ``pyarrow.ipc`` so ``datasets`` itself
is not needed. The reader only splits the input into batches; parsing JSON, joining fields, checking UTF-8
and tokenising happen in the workers (preprocess.py). Every document carries its location for errors: the
1-based line of a JSONL file, or the 0-based row (pyarrow's numbering) of a Parquet or Arrow file.
"""
import collections
import glob
import gzip
import io
import json
import os

from .errors import DataError

# Name endings and the format each means, longest first ("x.jsonl.gz" is not plain JSONL).
SUFFIXES = ((".jsonl.gz", "jsonl.gz"), (".json.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"),
            (".json.zst", "jsonl.zst"), (".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"))
VALID = ("a .jsonl/.json file (one JSON object per line), .jsonl.gz, .jsonl.zst, a .parquet file, a directory "
         "of them, a datasets save_to_disk directory (state.json + .arrow files), or a glob of these")
SAVE_TO_DISK_MARKERS = ("state.json", "dataset_info.json")

Source = collections.namedtuple("Source", "path format size")   # format: a SUFFIXES value or "arrow"
# kind "jsonl": items are (line number, raw line bytes); kind "fields": (row, tuple of str | bytes | None, one
# per key). done_bytes: on-disk bytes of the source consumed once this batch was read (for the ETA).
Batch = collections.namedtuple("Batch", "kind path items done_bytes")


class InputFormatError(DataError):
    """An input that cannot be read: no such path, an unknown format, a damaged file, a missing column."""


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def format_of(path):
    """The format a file name means, or None."""
    name = os.path.basename(path).lower()
    return next((fmt for suffix, fmt in SUFFIXES if name.endswith(suffix)), None)


def source_stem(source):
    """The input's name without its format ending (a save_to_disk directory: its own name)."""
    name = os.path.basename(os.path.normpath(source.path))
    suffix = next((s for s, _ in SUFFIXES if name.lower().endswith(s)), "")
    return name[:len(name) - len(suffix)] if suffix else name


def _directory_sources(path):
    if any(os.path.isfile(os.path.join(path, m)) for m in SAVE_TO_DISK_MARKERS):
        files = _arrow_files(path)
        return [Source(path, "arrow", sum(os.path.getsize(f) for f in files))]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise InputFormatError(f"{path} is a datasets DatasetDict (splits: {', '.join(splits)}); give one split's "
                               f"directory, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
    names = sorted(n for n in os.listdir(path) if format_of(n) and os.path.isfile(os.path.join(path, n)))
    if not names:
        raise InputFormatError(f"directory {path} holds no input file and no save_to_disk state.json; expected "
                               f"{VALID}")
    return [_file_source(os.path.join(path, n)) for n in names]


def _file_source(path):
    fmt = format_of(path)
    if fmt is None:
        raise InputFormatError(f"{path}: unknown input format; expected {VALID}")
    return Source(path, fmt, os.path.getsize(path))


def resolve_inputs(inputs):
    """The sources ``inputs`` (files, directories or globs, in the order given; a glob or a directory in
    sorted name order) name. InputFormatError for a path that does not exist, a glob matching nothing, a
    file of unknown format or a directory holding no input."""
    sources = []
    for spec in inputs:
        if os.path.exists(spec):
            paths = [spec]
        elif glob.has_magic(spec):
            paths = sorted(glob.glob(spec, recursive=True))
            if not paths:
                raise InputFormatError(f"--input {spec} matches no file")
        else:
            raise InputFormatError(f"--input {spec} does not exist")
        for path in paths:
            sources.extend(_directory_sources(path) if os.path.isdir(path) else [_file_source(path)])
    return sources


def read_batches(source, keys, batch_docs=256, batch_bytes=1 << 18):
    """Batches of at most ``batch_docs`` documents or about ``batch_bytes`` bytes of ``source``, so short
    and very long documents both give tasks that balance across workers."""
    if source.format == "parquet":
        return _parquet_batches(source, keys, batch_docs, batch_bytes)
    if source.format == "arrow":
        return _arrow_batches(source, keys, batch_docs, batch_bytes)
    return _jsonl_batches(source, batch_docs, batch_bytes)


# ---- JSONL -------------------------------------------------------------------------------------------

def _open_jsonl(path, fmt):
    """(line stream, raw file whose tell() is the on-disk position)."""
    if fmt == "jsonl.zst":
        import pyarrow as pa
        raw = pa.OSFile(path)
        return io.BufferedReader(pa.CompressedInputStream(raw, "zstd"), 1 << 20), raw
    raw = open(path, "rb")
    return (gzip.GzipFile(fileobj=raw) if fmt == "jsonl.gz" else raw), raw


def _jsonl_batches(source, batch_docs, batch_bytes):
    stream, raw = _open_jsonl(source.path, source.format)
    line_no = 0
    try:
        batch, nbytes = [], 0
        for line_no, line in enumerate(stream, 1):
            if not line.strip():
                continue   # blank lines (e.g. a trailing newline) are not documents
            batch.append((line_no, line))
            nbytes += len(line)
            if len(batch) == batch_docs or nbytes >= batch_bytes:
                yield Batch("jsonl", source.path, batch, raw.tell())
                batch, nbytes = [], 0
        if batch:
            yield Batch("jsonl", source.path, batch, source.size)
    except (OSError, EOFError, ValueError) as e:   # gzip/zstd: damaged or truncated stream
        raise InputFormatError(f"{source.path}:{line_no + 1}: cannot read the {source.format} file: "
                               f"{_first_line(e)}") from None
    finally:
        stream.close()
        raw.close()


# ---- Parquet and Arrow -------------------------------------------------------------------------------

TEXT_TYPES = ("string", "large_string", "string_view", "binary", "large_binary", "binary_view")


def _check_columns(path, schema, keys):
    for key in keys:
        if key not in schema.names:
            raise InputFormatError(f"{path} has no column {key!r}; its columns: {', '.join(schema.names)} "
                                   f"(choose one with --text-key)")
        kind = str(schema.field(key).type)
        if kind not in TEXT_TYPES:
            raise InputFormatError(f"{path}: column {key!r} holds {kind}, not text (valid: {', '.join(TEXT_TYPES)})")


def _column_values(path, column, first_row):
    """A text column as Python values (str for string columns, bytes for binary ones, None for null),
    naming the row of a string that is not valid UTF-8."""
    try:
        return column.to_pylist()
    except (UnicodeDecodeError, ValueError):
        for i in range(len(column)):
            try:
                column[i].as_py()
            except (UnicodeDecodeError, ValueError) as e:
                raise InputFormatError(f"{path}: row {first_row + i}: not valid UTF-8 ({_first_line(e)})") from None
        raise


def _split_record_batch(path, record_batch, keys, first_row, batch_docs, batch_bytes, done_bytes):
    """Batches of (row, field values) from one Arrow record batch, cut by document count and bytes; the
    last one carries ``done_bytes`` (the others None: no further progress to report)."""
    import pyarrow.compute as pc
    columns = [record_batch.column(k) for k in keys]
    nbytes = pc.binary_length(columns[0]).fill_null(0).to_numpy(zero_copy_only=False)
    for column in columns[1:]:
        nbytes = nbytes + pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    values = list(zip(*(_column_values(path, c, first_row) for c in columns)))
    start, total = 0, 0
    for i in range(len(values)):
        total += int(nbytes[i])
        if i + 1 - start == batch_docs or total >= batch_bytes or i + 1 == len(values):
            items = list(zip(range(first_row + start, first_row + i + 1), values[start:i + 1]))
            yield Batch("fields", path, items, done_bytes if i + 1 == len(values) else None)
            start, total = i + 1, 0


def _parquet_batches(source, keys, batch_docs, batch_bytes):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = source.path
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputFormatError(f"{path} is not a readable Parquet file: {_first_line(e)}") from None
    _check_columns(path, parquet.schema_arrow, keys)
    total_rows, row = max(parquet.metadata.num_rows, 1), 0
    try:
        # One reader per row group: a single iter_batches over the whole file keeps the row groups it has
        # decoded allocated (pyarrow 26: memory grew with the file), one per group frees each in turn.
        for group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(batch_size=batch_docs * 4, row_groups=[group],
                                           columns=list(dict.fromkeys(keys)), use_threads=False)
            while True:
                try:
                    record_batch = next(batches, None)
                except (pa.ArrowException, OSError) as e:
                    raise InputFormatError(f"{path}: row {row} (row group {group}): damaged Parquet data: "
                                           f"{_first_line(e)}") from None
                if record_batch is None:
                    break
                # ETA basis: the file's size in proportion to the rows read (row counts from its metadata).
                done = source.size * (row + record_batch.num_rows) // total_rows
                yield from _split_record_batch(path, record_batch, keys, row, batch_docs, batch_bytes, done)
                row += record_batch.num_rows
    finally:
        parquet.close()


def _arrow_files(directory):
    """The .arrow files of a save_to_disk directory, in order: state.json's _data_files, else data-*.arrow."""
    state = os.path.join(directory, "state.json")
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as f:
                names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputFormatError(f"{state} is not a datasets state file: {_first_line(e)}") from None
    else:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".arrow"))
    files = [os.path.join(directory, n) for n in names]
    for f in files:
        if not os.path.isfile(f):
            raise InputFormatError(f"{f}, listed by {state}, does not exist")
    if not files:
        raise InputFormatError(f"save_to_disk directory {directory} lists no .arrow file")
    return files


def _arrow_batches(source, keys, batch_docs, batch_bytes):
    import pyarrow as pa
    done_before = 0
    for path in _arrow_files(source.path):
        with pa.memory_map(path) as mapped:
            try:
                reader = pa.ipc.open_stream(mapped)   # datasets writes the IPC stream format
            except (pa.ArrowException, OSError) as e:
                raise InputFormatError(f"{path} is not a readable Arrow stream: {_first_line(e)}") from None
            _check_columns(path, reader.schema, keys)
            row = 0
            while True:
                try:
                    record_batch = reader.read_next_batch()
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as e:
                    raise InputFormatError(f"{path}: row {row}: damaged Arrow data: {_first_line(e)}") from None
                # ETA basis: the memory map's position, in on-disk bytes of the dataset's files.
                done = done_before + mapped.tell()
                yield from _split_record_batch(path, record_batch, keys, row, batch_docs, batch_bytes, done)
                row += record_batch.num_rows
        done_before += os.path.getsize(path)
