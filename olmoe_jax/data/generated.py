"""The two generated domains of the built-in corpus: `arithmetic` and `records`.

Both are seeded from a string (the corpus version), so a version number fixes every
document. They give the corpus text with learnable structure that is not prose: sums that
are right, totals that equal quantity times price, dates and ids in fixed formats. A model
that lowers its loss on them has learned something other than word statistics.
"""
from __future__ import annotations

import json
import random
from typing import Iterator

_FIRST = (
    "Maria", "James", "Aiko", "Omar", "Lena", "Pedro", "Grace", "Ivan", "Nadia", "Tom",
    "Fatima", "Lucas", "Mei", "Samuel", "Chloe", "Ravi", "Elena", "Kwame", "Sofia", "Noah",
    "Amara", "Jonas", "Yuki", "Daniel", "Leila", "Marco", "Hannah", "Tariq", "Ingrid", "Kofi",
    "Ana", "Felix", "Priya", "Hugo", "Zara", "Emil", "Rosa", "Arjun", "Clara", "Mateo",
)
_LAST = (
    "Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Okafor", "Petrov", "Khan", "Brown",
    "Nielsen", "Moreau", "Chen", "Kowalski", "Rossi", "Mensah", "Novak", "Garcia", "Berg", "Sato",
    "Ali", "Dubois", "Kim", "Costa", "Weber", "Ivanova", "Patel", "Jensen", "Moreno", "Adeyemi",
)
_CITIES = (
    "Lisbon", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima", "Oslo", "Cairo", "Pune", "Quito",
    "Dublin", "Seoul", "Accra", "Porto", "Kyoto", "Lyon", "Krakow", "Austin", "Tunis", "Perth",
)
_PRODUCTS = (
    ("notebook", 3.5), ("pencil", 0.75), ("stapler", 12.0), ("lamp", 24.99), ("chair", 89.0),
    ("mug", 7.25), ("backpack", 45.5), ("cable", 9.99), ("monitor", 179.0), ("kettle", 31.4),
    ("umbrella", 15.0), ("headphones", 59.9), ("bottle", 11.2), ("scissors", 6.8), ("desk", 210.0),
)
_SERVICES = ("auth", "billing", "search", "upload", "gateway", "mailer", "scheduler")
_LEVELS = ("INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG")


def _date(rng: random.Random, lo: int = 1990, hi: int = 2025) -> str:
    return f"{rng.randint(lo, hi):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _person(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return f"{first} {last}", f"{first.lower()}.{last.lower()}@example.com"


# ----------------------------------------------------------------------------- arithmetic

def _operand(rng: random.Random) -> int:
    # Mostly small numbers, some large, so both digit-level and carry patterns occur.
    return rng.randint(0, 10 ** rng.choice((1, 2, 2, 3, 3, 4)))


def _simple_line(rng: random.Random) -> str:
    op = rng.choice("+-*/")
    a, b = _operand(rng), _operand(rng)
    if op == "+":
        return f"{a} + {b} = {a + b}"
    if op == "-":
        return f"{a} - {b} = {a - b}"
    if op == "*":
        a, b = a % 1000, b % 100
        return f"{a} * {b} = {a * b}"
    b = b % 97 + 2
    q, r = divmod(a, b)
    return f"{a} / {b} = {q}" if r == 0 else f"{a} / {b} = {q} remainder {r}"


def _chain_line(rng: random.Random) -> str:
    """A two-step expression worked out one step at a time, e.g. (12 + 7) * 3 = 19 * 3 = 57."""
    a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 12)
    inner_op = rng.choice("+-")
    inner = a + b if inner_op == "+" else a - b
    return f"({a} {inner_op} {b}) * {c} = {inner} * {c} = {inner * c}"


def _word_problem(rng: random.Random) -> str:
    name = rng.choice(_FIRST)
    item, price = rng.choice(_PRODUCTS)
    start, bags, per_bag, given = (rng.randint(5, 60), rng.randint(2, 9), rng.randint(3, 15),
                                   rng.randint(1, 20))
    have = start + bags * per_bag
    lines = [
        f"Problem: {name} has {start} {item}s. {name} buys {bags} boxes of {per_bag} {item}s "
        f"and gives away {given}. How many {item}s does {name} have now?",
        f"{start} + {bags} * {per_bag} = {start} + {bags * per_bag} = {have}",
        f"{have} - {given} = {have - given}",
        f"Answer: {have - given}",
    ]
    if rng.random() < 0.5:
        bought, cents = bags * per_bag, round(price * 100)
        total = bought * cents
        lines.append(f"Each {item} costs {price:.2f}, so the {bought} new ones cost "
                     f"{bought} * {price:.2f} = {total // 100}.{total % 100:02d}.")
    return "\n".join(lines)


def arithmetic_documents(seed: str, n_docs: int) -> Iterator[str]:
    """`n_docs` exercise sheets of 8-24 items each; deterministic in `seed`."""
    rng = random.Random(f"arithmetic/{seed}")
    for i in range(n_docs):
        items = []
        for _ in range(rng.randint(8, 24)):
            kind = rng.random()
            items.append(_simple_line(rng) if kind < 0.6 else
                         _chain_line(rng) if kind < 0.85 else _word_problem(rng))
        yield f"Exercise sheet {i + 1}\n\n" + "\n".join(items) + "\n"


# ----------------------------------------------------------------------------- records

def _json_records(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 16)):
        name, email = _person(rng)
        lines.append(json.dumps({
            "id": rng.randint(1000, 99999), "name": name, "email": email,
            "age": rng.randint(18, 90), "city": rng.choice(_CITIES), "joined": _date(rng, 2005),
            "balance": round(rng.uniform(-500, 20000), 2), "active": rng.random() < 0.8,
        }))
    return "\n".join(lines)


def _csv_orders(rng: random.Random) -> str:
    # total = quantity * unit_price exactly, so the column is predictable from the others.
    lines = ["order_id,date,customer,city,product,quantity,unit_price,total"]
    order = rng.randint(10000, 90000)
    for _ in range(rng.randint(4, 20)):
        order += rng.randint(1, 40)
        item, price = rng.choice(_PRODUCTS)
        qty = rng.randint(1, 12)
        cents = round(price * 100) * qty
        lines.append(f"{order},{_date(rng, 2015)},{_person(rng)[0]},{rng.choice(_CITIES)},"
                     f"{item},{qty},{price:.2f},{cents // 100}.{cents % 100:02d}")
    return "\n".join(lines)


def _key_value(rng: random.Random) -> str:
    blocks = []
    for _ in range(rng.randint(2, 6)):
        name, email = _person(rng)
        blocks.append("\n".join((
            f"name: {name}", f"email: {email}",
            f"phone: +{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000000, 9999999)}",
            f"born: {_date(rng, 1940, 2005)}", f"city: {rng.choice(_CITIES)}",
            f"employee_id: E{rng.randint(10000, 99999)}",
        )))
    return "\n---\n".join(blocks)


def _log_lines(rng: random.Random) -> str:
    day = _date(rng, 2019)
    seconds = rng.randint(0, 80000)
    lines = []
    for _ in range(rng.randint(6, 24)):
        seconds += rng.randint(0, 90)
        h, m, s = seconds // 3600 % 24, seconds // 60 % 60, seconds % 60
        level, service = rng.choice(_LEVELS), rng.choice(_SERVICES)
        if level in ("INFO", "DEBUG"):
            msg = f"request {rng.randint(1, 10**6)} completed in {rng.randint(2, 2000)} ms"
        else:
            timeout = rng.choice((100, 250, 500, 1000))
            msg = f"retry {rng.randint(1, 5)}/5 after timeout of {timeout} ms"
        lines.append(f"{day} {h:02d}:{m:02d}:{s:02d} {level} {service}-{rng.randint(1, 9)} {msg}")
    return "\n".join(lines)


def records_documents(seed: str, n_docs: int) -> Iterator[str]:
    """`n_docs` record files: JSON lines, CSV orders, key-value cards or service logs."""
    rng = random.Random(f"records/{seed}")
    makers = (_json_records, _csv_orders, _key_value, _log_lines)
    for _ in range(n_docs):
        yield rng.choice(makers)(rng) + "\n"
