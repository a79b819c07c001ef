"""Downstream tasks: built-in ones drawn from the built-in corpus's generated domains, and
local JSONL task files.

A task is a list of items. A multiple-choice item has a query, its answer choices and the
index of the right one; a completion item has a query and the one right continuation.
Task file format (one JSON object per line; the file's stem names the task):

    {"query": "17 + 25 =", "choices": ["42", "43", "32", "52"], "gold": 0}
    {"query": "name: Mei Chen\\nemail:", "continuation": "mei.chen@example.com"}

A file holds one kind of item. Choices and continuations are joined to the query with one
space, as lm-evaluation-harness's default `target_delimiter` does (`harness.py` writes the
matching harness YAML).

Built-in tasks are generated from their own seed (`eval/<corpus version>/<task>`), never from
the training documents' streams, in the formats of the corpus's arithmetic and records
domains (olmoe_jax/data/generated.py). Short items such as "3 + 4 = 7" also occur in the
training text, as facts of a domain do; the items as a whole are not training documents.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable, Iterator

from olmoe_jax.data import generated
from olmoe_jax.data.corpus import VERSION
from olmoe_jax.data.errors import DataError

LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class Item:
    query: str
    choices: tuple[str, ...]  # one entry for a completion item
    gold: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "choice" | "completion"
    items: tuple[Item, ...]
    domain: str = ""  # the corpus domain it is drawn from, if any
    delimiter: str = " "  # joins the query to a choice (lm-eval's target_delimiter)

    @property
    def chance(self) -> float | None:
        """Accuracy of a uniform random guess (None for completion tasks)."""
        if self.kind != "choice":
            return None
        return sum(1.0 / len(it.choices) for it in self.items) / len(self.items)


# ----------------------------------------------------------------------------- built-in


def _four_numbers(rng: random.Random, answer: int, near: Callable[[random.Random, int], int]) -> tuple[list[str], int]:
    """The answer and three different distractors near it, shuffled; (choices, gold index)."""
    values = {answer}
    while len(values) < 4:
        values.add(near(rng, answer))
    choices = sorted(values, key=lambda _: rng.random())
    return [str(v) for v in choices], choices.index(answer)


def _near_sum(rng: random.Random, x: int) -> int:
    # Off by one, by ten, or one digit changed: each is a mistake the format allows.
    return max(0, x + rng.choice((-10, -2, -1, 1, 2, 10)))


def _add_small(rng: random.Random) -> Item:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    choices, gold = _four_numbers(rng, a + b, _near_sum)
    return Item(f"{a} + {b} =", tuple(choices), gold)


def _arith_mixed(rng: random.Random) -> Item:
    line = generated._simple_line(rng)  # pylint: disable=protected-access  (the corpus's own format)
    query, answer = line.split(" = ")
    if " remainder " in answer or answer.startswith("-"):
        return _arith_mixed(rng)  # keep answers a single non-negative number
    choices, gold = _four_numbers(rng, int(answer), lambda r, x: max(0, x + r.choice((-10, -1, 1, 10, x // 10 or 2))))
    return Item(f"{query} =", tuple(choices), gold)


def _email(rng: random.Random) -> Item:
    people: list[tuple[str, str]] = []  # a list, not a set: set order of strings changes per process
    while len(people) < 4:
        person = generated._person(rng)  # pylint: disable=protected-access
        if person not in people:
            people.append(person)
    name = people[0][0]
    order = sorted(range(4), key=lambda _: rng.random())
    return Item(f"name: {name}\nemail:", tuple(people[i][1] for i in order), order.index(0))


def _order_total(rng: random.Random) -> Item:
    item, price = rng.choice(generated._PRODUCTS)  # pylint: disable=protected-access
    qty = rng.randint(1, 12)
    cents = round(price * 100) * qty
    fmt = lambda c: f"{c // 100}.{c % 100:02d}"  # noqa: E731
    wrong = {cents}
    while len(wrong) < 4:
        q = rng.choice([x for x in range(1, 13) if x != qty])
        wrong.add(round(price * 100) * q)
    values = sorted(wrong, key=lambda _: rng.random())
    header = "order_id,date,customer,city,product,quantity,unit_price,total"
    row = (f"{rng.randint(10000, 90000)},{generated._date(rng, 2015)},"  # pylint: disable=protected-access
           f"{generated._person(rng)[0]},{rng.choice(generated._CITIES)},{item},{qty},{price:.2f},")
    # The CSV has no space after the comma: the choice carries none either (delimiter "").
    return Item(f"{header}\n{row}", tuple(fmt(v) for v in values), values.index(cents))


_CARD_FIELDS = ("email", "phone", "born", "city", "employee_id")


def _record_field(rng: random.Random) -> Item:
    """A key-value card cut after one field name; the choices are the values of four of the
    card's fields, so knowing what each field holds (a date, a city, an id) finds the answer."""
    card = generated._key_value(rng).split("\n---\n")[0].split("\n")  # pylint: disable=protected-access
    fields = dict(line.split(": ", 1) for line in card)
    asked = rng.choice(_CARD_FIELDS)
    others = rng.sample([f for f in _CARD_FIELDS if f != asked], 3)
    order = sorted([asked, *others], key=lambda _: rng.random())
    keys = list(fields)
    context = "\n".join(f"{k}: {fields[k]}" for k in keys[:keys.index(asked)]) + f"\n{asked}:"
    return Item(context, tuple(fields[f] for f in order), order.index(asked))


def _add_small_completion(rng: random.Random) -> Item:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return Item(f"{a} + {b} =", (str(a + b),), 0)


# name -> (kind, domain, item maker, one-line description)
BUILTIN: dict[str, tuple[str, str, Callable[[random.Random], Item], str]] = {
    "arith_add_small": ("choice", "arithmetic", _add_small, "a + b = ? for a, b < 50; four nearby numbers"),
    "arith_mixed": ("choice", "arithmetic", _arith_mixed, "+ - * / lines of the corpus's form; four nearby numbers"),
    "records_email": ("choice", "records", _email, "a key-value card's email from its name; four people's emails"),
    "records_field": ("choice", "records", _record_field, "a key-value card's next field value; values of four fields"),
    "records_total": ("choice", "records", _order_total, "a CSV order's total = quantity x unit price; four totals"),
    "arith_add_small_completion": ("completion", "arithmetic", _add_small_completion,
                                   "a + b = ? for a, b < 50, greedy exact match"),
}


def builtin_task(name: str, n_items: int = 200) -> Task:
    """A built-in task of `n_items` items, the same every call."""
    kind, domain, make, _ = BUILTIN[name]
    rng = random.Random(f"eval/{VERSION}/{name}")
    # A CSV field follows its comma directly: no space before the answer there.
    delim = "" if name == "records_total" else " "
    return Task(name, kind, tuple(make(rng) for _ in range(n_items)), domain, delim)


# ----------------------------------------------------------------------------- JSONL files


def read_jsonl(path: str, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSONL file; DataError naming the file (and
    `what` it should be) or the line on bad input."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path} does not exist; give {what}")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise DataError(f"{path}:{n}: a JSON {type(d).__name__}, expected an object")
        yield n, d


def load_jsonl_task(path: str) -> Task:
    """A task file (format in the module docstring); DataError naming the line on bad input."""
    items, kinds = [], set()
    for n, d in read_jsonl(path, "a .jsonl task file (format: olmoe_jax/eval/tasks.py)"):
        if not isinstance(d.get("query"), str):
            raise DataError(f"{path}:{n}: each line needs a string \"query\"")
        if "choices" in d:
            ch, gold = d["choices"], d.get("gold")
            if (not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch)
                    or not isinstance(gold, int) or not 0 <= gold < len(ch)):
                raise DataError(f"{path}:{n}: \"choices\" must be 2+ non-empty strings and \"gold\" "
                                "the index of the right one")
            items.append(Item(d["query"], tuple(ch), gold))
            kinds.add("choice")
        elif isinstance(d.get("continuation"), str) and d["continuation"]:
            items.append(Item(d["query"], (d["continuation"],), 0))
            kinds.add("completion")
        else:
            raise DataError(f"{path}:{n}: give \"choices\" + \"gold\" (multiple choice) or a non-empty "
                            "\"continuation\" (completion)")
    if not items:
        raise DataError(f"task file {path} holds no items")
    if len(kinds) > 1:
        raise DataError(f"task file {path} mixes multiple-choice and completion items; use one file each")
    return Task(Path(path).stem, kinds.pop(), tuple(items))


def write_jsonl_task(task: Task, path: str) -> None:
    """Writes `task` in the task file format (e.g. a built-in task for the harness)."""
    with open(path, "w", encoding="utf-8") as f:
        for it in task.items:
            d = ({"query": it.query, "choices": list(it.choices), "gold": it.gold} if task.kind == "choice"
                 else {"query": it.query, "continuation": it.choices[0]})
            f.write(json.dumps(d) + "\n")


def resolve_tasks(specs: list[str], n_items: int = 200) -> list[Task]:
    """Task names or .jsonl paths -> Tasks; "builtin" means every built-in task."""
    out = []
    for spec in specs:
        for s in (spec.split(",") if "," in spec else [spec]):
            s = s.strip()
            if s == "builtin":
                out.extend(builtin_task(n, n_items) for n in BUILTIN)
            elif s in BUILTIN:
                out.append(builtin_task(s, n_items))
            elif s.endswith(".jsonl"):
                out.append(load_jsonl_task(s))
            else:
                raise DataError(f"--tasks {s}: not a built-in task ({', '.join(BUILTIN)}, or builtin for "
                                "all) nor a .jsonl task file")
    return out
