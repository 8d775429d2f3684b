"""General-text and code corpora built from the Python standard library (present on every install).

  code     each stdlib module's source file is one document;
  general  natural language from the same files: module, class and function docstrings and full-line
           comment blocks, one document per module, plus pydoc's help topics (pydoc_data/topics.py).

Deduplication, because the stdlib repeats itself (generated codec tables, vendored copies, boilerplate
docstrings like "Return self==value."):
  * text paragraphs (blank-line separated, 40+ characters) are dropped when their normalised form
    (case-folded, whitespace collapsed) was seen before;
  * code files are dropped when identical after normalising whitespace, or when more than half of their
    substantial lines (20+ characters) already occurred in files kept before them (near duplicates such
    as encodings/cp*.py).
Files are visited in a seeded shuffle of their sorted relative paths, so a size cap takes a mix of
modules rather than the alphabetically first ones, and the output is a function of (Python version,
seed, caps). Comments are found as lines starting with '#' outside the line span of any string literal
(from the AST), which is correct for real code and much faster than the tokenize module.
"""
import ast
import hashlib
import inspect
import os
import random
import re
import sysconfig

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}
TEST_DIRS = {"test", "tests", "idle_test"}
_WS = re.compile(r"\s+")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_LETTERS = re.compile(r"[A-Za-z]")


def stdlib_files(include_tests=False, root=None):
    """Sorted relative paths of the stdlib's .py files (third-party site-packages excluded)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = SKIP_DIRS | (set() if include_tests else TEST_DIRS)
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("config-")]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):   # machine-specific
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return root, sorted(out)


def _is_prose(paragraph, min_chars=40):
    """Enough words and mostly letters: keeps sentences, drops commented-out code and ASCII art."""
    if len(paragraph) < min_chars or len(paragraph.split()) < 6:
        return False
    letters = len(_LETTERS.findall(paragraph))
    return letters / len(paragraph) > 0.6 and not paragraph.lstrip().startswith(("-*-", "!", "noqa", "type:"))


def _string_line_spans(tree):
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno > node.lineno:
            spans.append((node.lineno, node.end_lineno))
    return spans


def extract_prose(source, tree):
    """Docstrings and full-line comment blocks of one module, in source order, as paragraphs."""
    items = []   # (line, paragraph)
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, definitions)]:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            items.append((getattr(node, "lineno", 0), inspect.cleandoc(doc)))
    inside_string = set()
    for a, b in _string_line_spans(tree):
        inside_string.update(range(a + 1, b + 1))   # lines after a string's first line
    block, start = [], 0
    for no, line in enumerate(source.splitlines() + [""], 1):
        stripped = line.strip()
        if stripped.startswith("#") and no not in inside_string:
            if not block:
                start = no
            block.append(stripped.lstrip("#").strip())
        elif block:
            items.append((start, " ".join(x for x in block if x)))
            block = []
    items.sort(key=lambda x: x[0])
    return [p for _, p in items]


def _pydoc_topics(root):
    """pydoc's help texts: long string values of the ``topics`` dict in pydoc_data/topics.py."""
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.exists(path):
        return []
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and len(n.value) > 200]


class _Capped:
    """Rows of {"text", "source"} kept while they fit in ``max_bytes`` (whole documents only)."""

    def __init__(self, max_bytes):
        self.rows, self.size, self.max_bytes = [], 0, max_bytes

    def has_room(self):
        return self.size < self.max_bytes

    def nearly_full(self):
        return self.size >= self.max_bytes * 0.99

    def add(self, text, source):
        n = len(text.encode("utf-8"))
        if self.size + n <= self.max_bytes:
            self.rows.append({"text": text, "source": source})
            self.size += n


class _NewParagraphs:
    """Prose units (docstrings, comment blocks, topics) with every paragraph of 40+ characters that was
    seen before removed; short ones (headings, "Example::") stay to keep the text readable."""

    def __init__(self):
        self.seen = set()

    def __call__(self, units):
        kept = []
        for unit in units:
            if not _is_prose(unit):
                continue
            parts = []
            for part in _BLANK_LINE.split(unit):
                key = hashlib.sha1(_WS.sub(" ", part.casefold()).strip().encode()).digest()
                if len(part.strip()) < 40:
                    parts.append(part)
                elif key not in self.seen:
                    self.seen.add(key)
                    parts.append(part)
            text = "\n\n".join(parts)
            if _is_prose(text):
                kept.append(text)
        return kept


class _NewCode:
    """True for a source file that is neither a whitespace-normalised copy of one seen before nor more than
    half made of substantial lines (20+ characters) seen before, nor tiny; a file it accepts is seen."""

    def __init__(self):
        self.files, self.lines = set(), set()

    def __call__(self, source):
        digest = hashlib.sha1(_WS.sub(" ", source).strip().encode()).digest()
        lines = {ln.strip() for ln in source.splitlines() if len(ln.strip()) >= 20}
        repeated = len(lines & self.lines) / max(len(lines), 1)
        if digest in self.files or repeated > 0.5 or len(lines) < 5:
            return False
        self.files.add(digest)
        self.lines |= lines
        return True


def _parse_module(root, rel):
    """(source, AST) of the stdlib file ``rel``, or None for one that does not parse."""
    try:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            source = f.read()
        return source, ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None   # a few stdlib files are deliberately broken (test inputs) or not UTF-8


def _shuffled_work(root, files, seed):
    """(kind, source name, topic text or None) of the files and pydoc's topics, in the seeded order. The
    topics are shuffled in among the modules so a small cap still gets a mix of both."""
    topics = _pydoc_topics(root)
    work = [("file", rel) for rel in files] + [("topic", i) for i in range(len(topics))]
    random.Random(f"stdlib-{seed}").shuffle(work)
    return [("topic", f"pydoc_data/topics.py#{item}", topics[item]) if kind == "topic" else ("file", item, None)
            for kind, item in work]


def build_stdlib_corpora(max_bytes_general, max_bytes_code, seed=0, include_tests=False, root=None):
    """Return (general_rows, code_rows): lists of {"text", "source"} dicts, each list at most about its
    byte cap (whole documents only), deduplicated as the module docstring describes."""
    root, files = stdlib_files(include_tests, root)
    general, code = _Capped(max_bytes_general), _Capped(max_bytes_code)
    new_paragraphs, new_code = _NewParagraphs(), _NewCode()
    for kind, name, topic in _shuffled_work(root, files, seed):
        if general.nearly_full() and code.nearly_full():
            break
        if kind == "topic":
            text = new_paragraphs([topic]) if general.has_room() else None
            if text:
                general.add(text[0], name)
            continue
        parsed = _parse_module(root, name)
        if parsed is None:
            continue
        source, tree = parsed
        if code.has_room() and new_code(source):
            code.add(source, name)
        if general.has_room():
            text = "\n\n".join(new_paragraphs(extract_prose(source, tree)))
            if len(text) >= 200:
                general.add(text, name)
    return general.rows, code.rows
