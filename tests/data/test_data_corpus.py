"""The built-in corpus: deterministic, every domain in both splits, no leaks between splits."""
import collections
import hashlib
import os
import pathlib
import subprocess
import sys

from olmoe_jax.data import corpus


def test_stdlib_files_sorted_and_outside_site_packages_and_tests():
    root = corpus.stdlib_dir()
    files = corpus.stdlib_files(root)
    rels = [p.relative_to(root).as_posix() for p in files]
    assert rels == sorted(rels)
    assert len(rels) > 300  # the whole stdlib, not a corner of it
    bad = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not [r for r in rels if bad & set(r.split("/")[:-1])]
    assert not [r for r in rels if r.split("/")[-1].startswith("_sysconfigdata")]


def test_every_document_is_in_the_split_its_group_hashes_to(builtin_cfg):
    keys, domains_of_group = [], collections.defaultdict(set)
    splits_of_group = collections.defaultdict(set)
    for split in ("train", "validation"):
        stored = corpus.read_split(builtin_cfg.data.data_dir, split, ("key", "group", "domain"))
        for key, group, domain in stored:
            assert corpus.split_of(group) == split
            keys.append(key)
            splits_of_group[group].add(split)
            domains_of_group[group].add(domain)
    assert len(set(keys)) == len(keys) > 4000  # unique keys (TFDS needs them)
    # no stdlib file feeds both splits, and its code chunks and docstrings do share a group
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert sum(1 for d in domains_of_group.values() if d == {"code", "prose"}) > 100


_FINGERPRINT = """
import hashlib, sys
from olmoe_jax.data import corpus
docs = sorted(corpus.all_documents())
print(hashlib.sha256(repr(docs).encode()).hexdigest(), len(docs))
"""


def test_another_process_generates_exactly_the_prepared_documents(builtin_cfg):
    # Another process with another string-hash seed: nothing may depend on hash() or set order.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _FINGERPRINT], check=True, env=env,
                         capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[2])
    fields = ("key", "domain", "group", "text")
    stored = [corpus.Document(*doc) for split in ("train", "validation")
              for doc in corpus.read_split(builtin_cfg.data.data_dir, split, fields)]
    want = hashlib.sha256(repr(sorted(stored)).encode()).hexdigest()
    assert out.stdout.split() == [want, str(len(stored))]


def test_every_domain_in_both_splits_with_a_small_validation_share(builtin_cfg):
    size = {}
    for split in ("train", "validation"):
        size[split] = collections.Counter()
        for domain, text in corpus.read_split(builtin_cfg.data.data_dir, split):
            size[split][domain] += len(text.encode())
    assert set(size["train"]) == set(size["validation"]) == set(corpus.DOMAINS)
    total = sum(size["train"].values()) + sum(size["validation"].values())
    assert 5e6 < total < 10e6, total
    for domain in corpus.DOMAINS:
        share = size["validation"][domain] / (size["train"][domain] + size["validation"][domain])
        assert 0.01 < share < 0.06, (domain, share)
        assert size["train"][domain] > 0.5e6, domain  # no domain is a token gesture


def test_generated_domains_are_correct_arithmetic_and_consistent_records():
    import re
    from olmoe_jax.data.generated import arithmetic_documents, records_documents
    checked = 0
    for doc in arithmetic_documents(corpus.VERSION, 50):
        for a, op, b, c in re.findall(r"^(-?\d+) ([-+*]) (-?\d+) = (-?\d+)$", doc, re.M):
            assert eval(f"{a} {op} {b}") == int(c)  # noqa: S307 (digits and one operator)
            checked += 1
    assert checked > 200
    rows = 0
    for doc in records_documents(corpus.VERSION, 100):
        if doc.startswith("order_id,"):
            for line in doc.strip().split("\n")[1:]:
                qty, price, total = line.split(",")[-3:]
                assert round(int(qty) * float(price), 2) == float(total)
                rows += 1
    assert rows > 50
