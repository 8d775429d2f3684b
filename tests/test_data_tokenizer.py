"""Byte-level BPE tokenizer and trainer: round trips, GPT-2 file format, hand-checked merges, and an
independent reference BPE (written here from GPT-2's published algorithm, sharing no code)."""
import json
import os
import random
import subprocess
import sys

import pytest
import regex

from megagopher.data.bpe_trainer import build_vocab, count_words, learn_merges, train_bpe, write_tokenizer_files
from megagopher.data.math_problems import generate_problems
from megagopher.data.tokenizer import EOD_TOKEN, Tokenizer, bytes_to_unicode, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [r["text"] for r in generate_problems(200, seed=3)] + [
    "The quick brown fox jumps over the lazy dog. Don't panic; it's fine, we'll see.",
    "def hello(name):\n    return f'Hello, {name}!'\n\n\tindented\ttabs   and   spaces",
    "Ünïcödé façade naïve café — “quotes” 日本語のテキスト 😀👍🏽 مرحبا",
] * 5


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab, merges = train_bpe(count_words(CORPUS), 700)
    write_tokenizer_files(str(d), vocab, merges)
    return str(d)


# ---------------------------------------------------------------- random Unicode ----------------------
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    " \t\n\r\x0b\x0c\u00a0\u2028\u2029\u3000\u200b",             # whitespace runs, incl. Unicode spaces
    "".join(map(chr, range(0, 32))) + "\x7f\x80\x9f",             # control characters
    "".join(map(chr, range(0x300, 0x370))),                       # combining marks
    "éüñçøåßЖжЯ文字漢字한국어ไทยعربيעברית",
    ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "❤️", "🤷‍♀️", "\U0001f9d1\u200d\U0001f4bb"],   # emoji + ZWJ sequences
    ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", " 's"],        # GPT-2 contraction pieces
]


def random_text(rng):
    out = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.8:
            pool = rng.choice(POOLS)
            out.append(rng.choice(pool) * (rng.randint(1, 5) if rng.random() < 0.2 else 1))
        elif r < 0.97:   # any code point outside the surrogate block
            c = rng.randint(0, 0x10FFFF)
            out.append(chr(c) if not 0xD800 <= c < 0xE000 else "x")
        else:
            out.append(chr(rng.randint(0xD800, 0xDFFF)))   # lone surrogates survive too
    return "".join(out)


def test_round_trip_random_unicode(tok_dir):
    tok = load_tokenizer(tok_dir)
    bytes_only = Tokenizer(build_vocab([]), [])   # no merges: every byte its own token
    rng = random.Random(1234)
    texts = [random_text(rng) for _ in range(1500)] + ["", " ", "\n\n\n", "  \t \n x", EOD_TOKEN, "a\u0301" * 7]
    for text in texts:
        for t in (tok, bytes_only):
            ids = t.encode(text)
            assert all(isinstance(i, int) and 0 <= i < t.vocab_size for i in ids)
            assert t.decode(ids) == text, repr(text)
        assert len(bytes_only.encode(text)) == len(text.encode("utf-8", "surrogatepass"))


def test_merges_compress_and_decode_partial(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = CORPUS[0]
    assert len(tok.encode(text)) < 0.6 * len(text.encode())
    ids = tok.encode("😀")
    assert tok.decode(ids[:-1]).endswith("\ufffd")   # a cut character decodes with U+FFFD, not an error


# ---------------------------------------------------------------- trainer -----------------------------
def test_learnt_merges_hand_checked():
    # Pair counts (by hand): u g 20, p u 17, u n 16, h u 15, g s 5, b u 4 -> "u g";
    # then u n 16, h ug 15, p u 12, p ug 5, ug s 5, b u 4 -> "u n"; then h ug 15 -> "h ug";
    # then p un 12, hug s 5, p ug 5, b un 4 -> "p un"; then hug s 5 and p ug 5 tie: the
    # lexicographically smaller pair ("hug" < "p") wins -> "hug s"; then p ug 5 -> "p ug".
    counts = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}
    assert learn_merges(counts, 6) == [("u", "g"), ("u", "n"), ("h", "ug"), ("p", "un"), ("hug", "s"), ("p", "ug")]
    assert learn_merges(counts, 100, min_frequency=5)[-1] == ("p", "ug")   # stops before the count-4 pair
    assert len(learn_merges(counts, 100, min_frequency=5)) == 6


def test_trainer_pretokenises_and_lays_out_ids_like_gpt2():
    # " hug" carries its leading space as "Ġ"; merges never cross a pre-token boundary (the space).
    # Pairs: u g 4, h u 3, Ġ h 2, Ġ p 1, p u 1 -> "u g"; then h ug 3 (hug + 2 x Ġhug), Ġ h 2 -> "h ug".
    counts = count_words(["hug hug hug pug"])
    assert counts == {"hug": 1, "Ġhug": 2, "Ġpug": 1}
    vocab, merges = train_bpe(counts, 256 + 1 + 2)
    assert merges == [("u", "g"), ("h", "ug")]
    # GPT-2's byte ids: '!' is 0, byte 0 ('Ā') is 188, space ('Ġ') is 220; merges follow, then the EOD.
    assert vocab["!"] == 0 and vocab["Ā"] == 188 and vocab["Ġ"] == 220
    assert vocab["ug"] == 256 and vocab["hug"] == 257 and vocab[EOD_TOKEN] == 258


def test_train_tokenizer_tool_writes_gpt2_files(tmp_path):
    src = tmp_path / "docs.jsonl"
    with open(src, "w") as f:
        for text in CORPUS:
            f.write(json.dumps({"body": text}) + "\n")
        f.write("{not json\n")
    outs = []
    for name in ("a", "b"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools/train_tokenizer.py"), "--input", str(src),
                            "--json-key", "body", "--vocab-size", "400", "--output-dir", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"line {len(CORPUS) + 1}: not valid JSON" in r.stderr and "1 malformed line" in r.stderr
        outs.append([open(tmp_path / name / f, encoding="utf-8").read() for f in ("vocab.json", "merges.txt")])
    assert outs[0] == outs[1]                       # deterministic
    vocab = json.loads(outs[0][0])
    lines = outs[0][1].splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 400 - 257
    assert all(len(line.split(" ")) == 2 for line in lines[1:])
    assert len(vocab) == 400 and vocab[EOD_TOKEN] == 399 and sorted(vocab.values()) == list(range(400))
    assert all(c in vocab for c in bytes_to_unicode().values())
    tok = load_tokenizer(str(tmp_path / "a"))
    assert tok.eod == 399 and tok.vocab_size == 400


# ---------------------------------------------------------------- GPT-2 format + reference BPE --------
def reference_byte_map():
    """GPT-2's byte map rebuilt differently: bytes that are printable and not space in Latin-1 keep their
    character; the rest get 256, 257, ... in byte order."""
    keep = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 255 and b != 173)]
    out, extra = {}, 256
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(extra)
            extra += 1
    return out


def reference_encode(text, encoder, ranks):
    """openai/gpt-2 encoder.py's algorithm: pre-tokenise, map bytes, then repeatedly merge the lowest-ranked
    adjacent pair (all its occurrences) until none has a rank."""
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    bmap = reference_byte_map()
    ids = []
    for piece in pat.findall(text):
        word = tuple(bmap[b] for b in piece.encode("utf-8"))
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        ids.extend(encoder[t] for t in word)
    return ids


def test_loads_gpt2_files_and_matches_reference_bpe(tmp_path):
    # A vocabulary in GPT-2's on-disk format with ids NOT in our trainer's layout (shuffled), a merge
    # list in rank order, and ASCII-escaped JSON as OpenAI ships it.
    vocab, merges = train_bpe(count_words(CORPUS), 900)
    tokens = list(vocab)
    random.Random(0).shuffle(tokens)
    shuffled = {t: i for i, t in enumerate(tokens)}
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled, ensure_ascii=True))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    assert bytes_to_unicode() == reference_byte_map()
    tok = load_tokenizer(str(tmp_path))
    ranks = {tuple(m): i for i, m in enumerate(merges)}
    rng = random.Random(7)
    texts = CORPUS[:60] + [random_text(rng).encode("utf-8", "replace").decode("utf-8") for _ in range(300)]
    for text in texts:
        assert tok.encode(text) == reference_encode(text, shuffled, ranks), repr(text)
    assert tok.eod == shuffled[EOD_TOKEN] and tok.vocab_size == 900


def test_special_tokens():
    vocab, merges = train_bpe(count_words(CORPUS), 400, special_tokens=[EOD_TOKEN, "<|pad|>"])
    tok = Tokenizer(vocab, merges)
    text = f"end{EOD_TOKEN}start<|pad|>"
    assert tok.eod not in tok.encode(text)              # plain text cannot forge a document boundary
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(tok.eod) == 1 and vocab["<|pad|>"] in ids and tok.decode(ids) == text
    assert tok.decode([tok.eod]) == EOD_TOKEN
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special=["<|nope|>"])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(str(tmp_path))
    vocab, merges = train_bpe(count_words(CORPUS), 300)
    write_tokenizer_files(str(tmp_path), {k: v for k, v in vocab.items() if k != EOD_TOKEN}, merges)
    with pytest.raises(ValueError, match="endoftext"):
        load_tokenizer(str(tmp_path))
    write_tokenizer_files(str(tmp_path), vocab, merges)
    with open(tmp_path / "merges.txt", "a") as f:
        f.write("a b c\n")
    with pytest.raises(ValueError, match=r"merges.txt line \d+"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size 200 is too small"):
        train_bpe({"ab": 3}, 200)
