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


def build_stdlib_corpora(max_bytes_general, max_bytes_code, seed=0, include_tests=False, root=None):
    """Return (general_rows, code_rows): lists of {"text", "source"} dicts, each list at most about its
    byte cap (whole documents only), deduplicated as the module docstring describes."""
    root, files = stdlib_files(include_tests, root)
    topics = _pydoc_topics(root)
    # pydoc's topics are shuffled in among the modules so a small cap still gets a mix of both.
    work = [("file", rel) for rel in files] + [("topic", i) for i in range(len(topics))]
    random.Random(f"stdlib-{seed}").shuffle(work)
    general, code = [], []
    size_general = size_code = 0
    seen_paragraphs, seen_files, seen_lines = set(), set(), set()

    def add_general(text, source):
        nonlocal size_general
        n = len(text.encode("utf-8"))
        if size_general + n <= max_bytes_general:
            general.append({"text": text, "source": source})
            size_general += n

    def new_paragraphs(units):
        """Prose units (docstrings, comment blocks, topics) with every paragraph of 40+ characters that
        was seen before removed; short ones (headings, "Example::") stay to keep the text readable."""
        kept = []
        for unit in units:
            if not _is_prose(unit):
                continue
            parts = []
            for part in _BLANK_LINE.split(unit):
                key = hashlib.sha1(_WS.sub(" ", part.casefold()).strip().encode()).digest()
                if len(part.strip()) < 40:
                    parts.append(part)
                elif key not in seen_paragraphs:
                    seen_paragraphs.add(key)
                    parts.append(part)
            text = "\n\n".join(parts)
            if _is_prose(text):
                kept.append(text)
        return kept

    for kind, rel in work:
        if size_general >= max_bytes_general * 0.99 and size_code >= max_bytes_code * 0.99:
            break
        if kind == "topic":
            text = new_paragraphs([topics[rel]]) if size_general < max_bytes_general else None
            if text:
                add_general(text[0], f"pydoc_data/topics.py#{rel}")
            continue
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue   # a few stdlib files are deliberately broken (test inputs) or not UTF-8
        if size_code < max_bytes_code:
            digest = hashlib.sha1(_WS.sub(" ", source).strip().encode()).digest()
            lines = {ln.strip() for ln in source.splitlines() if len(ln.strip()) >= 20}
            repeated = len(lines & seen_lines) / max(len(lines), 1)
            if digest not in seen_files and repeated <= 0.5 and len(lines) >= 5:
                seen_files.add(digest)
                seen_lines |= lines
                n = len(source.encode("utf-8"))
                if size_code + n <= max_bytes_code:
                    code.append({"text": source, "source": rel})
                    size_code += n
        if size_general < max_bytes_general:
            paragraphs = new_paragraphs(extract_prose(source, tree))
            text = "\n\n".join(paragraphs)
            if len(text) >= 200:
                add_general(text, rel)
    return general, code
