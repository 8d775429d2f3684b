"""Arithmetic word problems with worked solutions, generated offline (the math corpus and evaluation).

Eight story families (shopping, travel, factory output, fractions of a collection, unit conversion,
savings, discounts, baking) each come in four difficulty levels: the number of solution steps, one to
four. Level 1 is one multiplication or division on small numbers (a one-digit number times a one-digit
number, a multiple of ten or a unit's 60, 100 or 1000; at most 90 divided 2 to 10 ways), small enough for
a tiny model to learn in minutes; levels 2-4 draw larger numbers. Every step is one sentence holding one
equation written ``a * b = c`` (``$`` on money, ``*`` and ``/`` for times and divide) so a test can
re-check all arithmetic, and the text ends with "The answer is N." Numbers are drawn so every
intermediate result is whole or whole cents. Problem i of a split comes from
``random.Random("math-<split>-<seed>-<i>")`` (string seeds hash with SHA-512, stable across runs and
Python versions), so the corpus is a pure function of the seed.

``extract_answer(text)`` reads the final number back (from "The answer is N", else the last number),
normalised ("1,200.50" -> "1200.5"), for final-answer accuracy on model generations.
"""
import random
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

NAMES = ["Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kenji",
         "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera",
         "Wei", "Ximena", "Yusuf", "Zoe"]


def num(x):
    """Canonical number string: 12, 7.5, 0.25 (no trailing zeros)."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return format(d.normalize(), "f")


def money(x):
    x = Fraction(x)
    return f"${x.numerator // x.denominator}" if x.denominator == 1 else f"${float(x):.2f}"


def _ladder(steps, stages):
    """The problem of ``steps`` steps built from the first ``steps`` of ``stages``, each (sentence the
    stage adds to the question or None, its solution line, the question that ends a problem stopping
    there, the answer then): the question is the stages' sentences and the last one's closing question."""
    told = [stage[0] for stage in stages[:steps] if stage[0] is not None]
    *_, ask, answer = stages[steps - 1]
    return told + [ask], [stage[1] for stage in stages[:steps]], answer


def _shopping(r, steps):
    name, (item, plural), (item2, plural2) = r.choice(NAMES), *r.sample(
        [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"),
         ("sticker pack", "sticker packs"), ("comic", "comics"), ("candle", "candles")], 2)
    if steps == 1:   # one-digit count and whole one-digit price
        n1, p1 = r.randint(2, 9), Fraction(r.randint(2, 9))
    else:
        n1, p1 = r.randint(2, 12), Fraction(r.randint(2, 40), 4)
    n2, p2 = r.randint(2, 9), Fraction(r.randint(1, 24), 2)
    c1, c2 = n1 * p1, n2 * p2
    q = [f"{name} buys {n1} {plural} at {money(p1)} each."]
    sol = [f"The {plural} cost {n1} * {money(p1)} = {money(c1)}."]
    total = c1
    if steps >= 3:
        q.append(f"{name} also buys {n2} {plural2} at {money(p2)} each.")
        sol.append(f"The {plural2} cost {n2} * {money(p2)} = {money(c2)}.")
        total = c1 + c2
        sol.append(f"Altogether {name} spends {money(c1)} + {money(c2)} = {money(total)}.")
    if steps in (2, 4):
        bill = next(b for b in (10, 20, 50, 100, 200, 500) if b > total)
        q.append(f"{name} pays with a {money(bill)} bill. How much change does {name} get?")
        sol.append(f"The change is {money(bill)} - {money(total)} = {money(bill - total)}.")
        return q, sol, bill - total
    q.append(f"How much does {name} spend in dollars?")
    return q, sol, total


def _travel(r, steps):
    name, vehicle = r.choice(NAMES), r.choice(["car", "train", "bus", "bicycle", "boat"])
    v1, v2 = r.randint(2, 24) * 5, r.randint(2, 24) * 5
    t1, t2 = r.randint(2, 6), r.randint(2, 5)
    if steps == 1:
        v1, t1 = r.randint(2, 9) * 10, r.randint(2, 9)
        return ([f"{name}'s {vehicle} travels at {v1} km per hour for {t1} hours.",
                 "How many kilometres does it travel?"], [f"It travels {v1} * {t1} = {v1 * t1} km."], v1 * t1)
    if steps == 2:
        minutes = r.choice([30, 90, 150, 210, 45, 75, 120])
        hours = Fraction(minutes, 60)
        v = r.randint(1, 20) * 4 if hours.denominator == 4 else v1
        return ([f"{name}'s {vehicle} travels at {v} km per hour for {minutes} minutes.",
                 "How many kilometres does it travel?"],
                [f"{minutes} minutes is {minutes} / 60 = {num(hours)} hours.",
                 f"It travels {v} * {num(hours)} = {num(v * hours)} km."], v * hours)
    d1, d2 = v1 * t1, v2 * t2
    q = [f"{name}'s {vehicle} travels at {v1} km per hour for {t1} hours, then at {v2} km per hour "
         f"for {t2} hours."]
    sol = [f"The first part is {v1} * {t1} = {d1} km.", f"The second part is {v2} * {t2} = {d2} km.",
           f"In total that is {d1} + {d2} = {d1 + d2} km."]
    if steps == 3:
        return q + ["How many kilometres does it travel in total?"], sol, d1 + d2
    trip = d1 + d2 + r.randint(1, 40) * 5
    q += [f"The whole trip is {trip} km. How many kilometres are left to go?"]
    return q, sol + [f"There are {trip} - {d1 + d2} = {trip - d1 - d2} km left."], trip - d1 - d2


def _factory(r, steps):
    thing = r.choice(["toys", "chairs", "bottles", "lamps", "cups", "boxes"])
    bad_div = r.choice([4, 5, 10])
    per_hour, hours, days = bad_div * r.randint(1, 6), r.randint(4, 10), r.randint(2, 7)
    per_day = per_hour * hours
    total = per_day * days
    faulty = total // bad_div   # per_hour is a multiple of bad_div, so this is exact
    if steps == 1:
        per_hour, hours = r.randint(2, 9), r.randint(2, 9)
        per_day = per_hour * hours
        return ([f"A machine makes {per_hour} {thing} per hour. It runs {hours} hours a day.",
                 f"How many {thing} does it make in a day?"],
                [f"It makes {per_hour} * {hours} = {per_day} {thing} a day."], per_day)
    q, sol, answer = _ladder(steps - 1, [
        (f"A machine makes {per_hour} {thing} per hour and runs {hours} hours a day for {days} days.",
         f"In {days} days it makes {per_day} * {days} = {total} {thing}.", f"How many {thing} does it make?", total),
        (f"One in every {bad_div} {thing} it makes is faulty.",
         f"The faulty ones are {total} / {bad_div} = {faulty} {thing}.", f"How many faulty {thing} does it make?",
         faulty),
        (None, f"The good ones are {total} - {faulty} = {total - faulty} {thing}.",
         f"How many good {thing} does it make?", total - faulty)])
    return q, [f"Each day it makes {per_hour} * {hours} = {per_day} {thing}."] + sol, answer


def _fractions(r, steps):
    name, thing = r.choice(NAMES), r.choice(["marbles", "stickers", "cards", "stamps", "shells", "coins"])
    if steps == 1:   # a unit fraction of a small collection: one division
        den = r.choice([2, 3, 4, 5])
        start = den * r.randint(2, 9)
        return ([f"{name} has {start} {thing}. {name} gives 1/{den} of them to a friend.",
                 f"How many {thing} does {name} give away?"],
                [f"1/{den} of {start} is {start} / {den} = {start // den}."], start // den)
    den = r.choice([2, 3, 4, 5, 6])
    f1, f2 = Fraction(r.randint(1, den - 1), den), Fraction(1, r.choice([2, 3, 4]))
    # Start from a multiple of every denominator used, so each part is a whole number.
    start = f1.denominator * f2.denominator * r.randint(1, 8)
    gave = start * f1
    left = start - gave
    shared = left * f2
    q, sol, answer = _ladder(steps, [
        (f"{name} gives {f1.numerator}/{f1.denominator} of them to a friend.",
         f"{f1.numerator}/{f1.denominator} of {start} is {start} * {f1.numerator} / {f1.denominator} = {gave}.",
         f"How many {thing} does {name} give away?", gave),
        (None, f"{name} has {start} - {gave} = {left} {thing} left.", f"How many {thing} does {name} have left?",
         left),
        (f"Then {name} gives 1/{f2.denominator} of the rest to a cousin.",
         f"1/{f2.denominator} of {left} is {left} / {f2.denominator} = {shared}.",
         f"How many {thing} does the cousin get?", shared),
        (None, f"{name} keeps {left} - {shared} = {left - shared} {thing}.", f"How many {thing} does {name} keep?",
         left - shared)])
    return [f"{name} has {start} {thing}."] + q, sol, answer


_UNITS = [("metres", "centimetres", 100, "rope", "long", "cut into pieces", "pieces"),
          ("kilograms", "grams", 1000, "bag of flour", "heavy", "split into portions", "portions"),
          ("litres", "millilitres", 1000, "jug of juice", "full", "poured into glasses", "glasses"),
          ("hours", "minutes", 60, "shift", "long", "divided into tasks", "tasks")]


def _units(r, steps):
    big, small, factor, thing, adj, verb, parts = r.choice(_UNITS)
    amount = r.randint(2, 9)
    total = amount * factor
    piece = r.choice([d for d in range(5, factor // 2 + 1) if total % d == 0 and d % 5 == 0])
    pieces = total // piece
    used = r.randint(1, pieces - 1)
    price = r.randint(1, 9)
    return _ladder(steps, [
        (f"A {thing} is {amount} {big} {adj}.", f"{amount} {big} is {amount} * {factor} = {total} {small}.",
         f"How many {small} is that?", total),
        (f"It is {verb} of {piece} {small} each.", f"That makes {total} / {piece} = {pieces} {parts}.",
         f"How many {parts} are there?", pieces),
        (f"{used} of the {parts} are used.", f"{pieces} - {used} = {pieces - used} {parts} are left.",
         f"How many {parts} are left?", pieces - used),
        (None, f"They sell for {pieces - used} * {money(price)} = {money((pieces - used) * price)}.",
         f"Each of the {parts} left is sold for {money(price)}. How many dollars does that bring in?",
         (pieces - used) * price)])


def _savings(r, steps):
    name = r.choice(NAMES)
    weekly, weeks, had = r.randint(3, 30), r.randint(2, 12), r.randint(5, 60)
    if steps == 1:   # one-digit amount times one-digit weeks
        weekly, weeks = r.randint(2, 9), r.randint(2, 9)
    saved = weekly * weeks
    people = r.choice([2, 3, 4, 5])
    left = people * r.randint(1, (saved + had - 1) // people)   # what is left shares out evenly
    cost = saved + had - left
    return _ladder(steps, [
        (f"{name} saves {money(weekly)} every week for {weeks} weeks.",
         f"{name} saves {money(weekly)} * {weeks} = {money(saved)}.", f"How much does {name} save?", saved),
        (f"{name} already had {money(had)}.",
         f"With the {money(had)} from before, {name} has {money(saved)} + {money(had)} = {money(saved + had)}.",
         f"How much money does {name} have now?", saved + had),
        (f"{name} spends {money(cost)} on a present.",
         f"After the present, {money(saved + had)} - {money(cost)} = {money(left)} is left.",
         "How much money is left?", left),
        (None, f"Each friend gets {money(left)} / {people} = {money(Fraction(left, people))}.",
         f"{name} shares what is left equally among {people} friends. How much does each friend get?",
         Fraction(left, people))])


def _discount(r, steps):
    name, item = r.choice(NAMES), r.choice(["jacket", "lamp", "backpack", "kettle", "board game", "chair"])
    if steps == 1:   # a percentage that is a unit fraction makes the discount one division
        pct = r.choice([10, 20, 25, 50])
        off = r.randint(2, 9)
        price = off * 100 // pct
        return ([f"A {item} costs {money(price)}. It is on sale at {pct}% off.",
                 "How many dollars is the discount?"],
                [f"{pct}% of {money(price)} is {money(price)} / {100 // pct} = {money(off)}."], off)
    pct = r.choice([10, 20, 25, 30, 40, 50])
    price = 20 * r.randint(1, 20)   # a multiple of 20 keeps every one of these percentages whole
    off = Fraction(price * pct, 100)
    sale = price - off
    n = r.randint(2, 5)
    bill = next(b for b in (50, 100, 200, 500, 1000, 2000) if b > n * sale)
    return _ladder(steps, [
        (f"A {item} costs {money(price)}. It is on sale at {pct}% off.",
         f"The discount is {money(price)} * {pct} / 100 = {money(off)}.", "How many dollars is the discount?", off),
        (None, f"The sale price is {money(price)} - {money(off)} = {money(sale)}.",
         "What is the sale price in dollars?", sale),
        (f"{name} buys {n} of them at the sale price.", f"{n} of them cost {n} * {money(sale)} = {money(n * sale)}.",
         f"How much does {name} pay?", n * sale),
        (None, f"The change is {money(bill)} - {money(n * sale)} = {money(bill - n * sale)}.",
         f"{name} pays with {money(bill)}. How much change does {name} get?", bill - n * sale)])


def _baking(r, steps):
    name, food = r.choice(NAMES), r.choice(["cookies", "muffins", "rolls", "cupcakes", "pies"])
    trays, per_tray, bag = r.randint(2, 9), r.randint(6, 24), r.choice([2, 3, 4, 5, 6])
    if steps == 1:   # one-digit trays times one-digit per tray; the later stages' numbers go unused
        per_tray, bag = r.randint(2, 9), 2
    baked = trays * per_tray
    eaten = r.randint(1, min(9, baked - bag))
    left = baked - eaten
    left_even = left - left % bag
    eaten = baked - left_even
    bags = left_even // bag
    price = Fraction(r.randint(4, 30), 4)
    return _ladder(steps, [
        (f"{name} bakes {trays} trays of {food} with {per_tray} on each tray.",
         f"{name} bakes {trays} * {per_tray} = {baked} {food}.", f"How many {food} does {name} bake?", baked),
        (f"The family eats {eaten} of them.", f"After that, {baked} - {eaten} = {left_even} {food} are left.",
         f"How many {food} are left?", left_even),
        (f"The rest are put in bags of {bag}.", f"That fills {left_even} / {bag} = {bags} bags.",
         "How many bags are filled?", bags),
        (None, f"The bags bring in {bags} * {money(price)} = {money(bags * price)}.",
         f"Each bag sells for {money(price)}. How many dollars do the bags bring in?", bags * price)])


FAMILIES = {"shopping": _shopping, "travel": _travel, "factory": _factory, "fractions": _fractions,
            "units": _units, "savings": _savings, "discount": _discount, "baking": _baking}


def generate_problem(rng, steps=None, family=None):
    """One problem from ``rng`` (a random.Random): a dict with text (question, worked solution and a last
    line "The answer is N."), question, answer (canonical number string), steps (1-4) and family."""
    steps = steps or rng.randint(1, 4)
    family = family or rng.choice(sorted(FAMILIES))
    question, solution, answer = FAMILIES[family](rng, steps)
    question = " ".join(question)
    text = question + "\n" + "\n".join(solution) + f"\nThe answer is {num(answer)}."
    return {"text": text, "question": question, "answer": num(answer), "steps": steps, "family": family}


def generate_problems(num_problems, seed=0, split="train"):
    """``num_problems`` problems, problem i drawn from Random(f"math-{split}-{seed}-{i}")."""
    return [generate_problem(random.Random(f"math-{split}-{seed}-{i}")) for i in range(num_problems)]


def make_math_splits(num_train, num_eval, seed=0, train_levels=None):
    """(train, eval) lists with no question in both and no repeated question: the evaluation split is
    drawn first from its own stream; train problems equal to an earlier one are skipped (and replaced),
    so a model is never evaluated on a question it was trained on. ``train_levels`` (four weights, for
    levels 1-4) skews the train split's levels, e.g. towards easy problems; the evaluation split always
    draws them evenly, and without weights so does the train split."""
    if train_levels is not None:
        train_levels = list(train_levels)
        if len(train_levels) != 4 or min(train_levels) < 0 or sum(train_levels) <= 0:
            raise ValueError(f"train_levels {train_levels} must be four weights >= 0 (levels 1-4), not all 0")
    seen, splits = set(), []
    for split, wanted, weights in (("eval", num_eval, None), ("train", num_train, train_levels)):
        rows, i = [], 0
        while len(rows) < wanted:
            rng = random.Random(f"math-{split}-{seed}-{i}")
            steps = rng.choices((1, 2, 3, 4), weights)[0] if weights else None
            row = generate_problem(rng, steps)
            i += 1
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
            if i > 20 * wanted + 1000:
                raise RuntimeError(f"could not draw {wanted} distinct {split} problems")
        splits.append(rows)
    return splits[1], splits[0]


_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(s):
    """'1,200.50' -> '1200.5', '$8.00' -> '8'; None if s is not a number."""
    try:
        d = Decimal(s.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def extract_answer(text):
    """The final numeric answer of a solution, normalised (see normalize_number), or None. Uses the last
    "The answer is N"; without one, the last number in the text (the usual GSM8K-style fallback)."""
    found = _ANSWER_IS.findall(text)
    if not found:
        found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None
