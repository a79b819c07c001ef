"""The built-in corpus: deterministic, every domain in both splits, no leaks between splits."""
import collections
import os
import pathlib
import subprocess
import sys

import pytest

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


@pytest.fixture(scope="module")
def documents():
    return list(corpus.all_documents())


def test_prepared_data_is_the_generated_documents(builtin_cfg, documents):
    assert len({d.key for d in documents}) == len(documents)  # keys are unique (TFDS needs it)
    for split in ("train", "validation"):
        want = sorted((d.domain, d.text) for d in documents if corpus.split_of(d.group) == split)
        assert sorted(corpus.read_split(builtin_cfg.data.data_dir, split)) == want


def test_second_preparation_in_another_process_gives_the_same_documents_in_order(builtin_cfg, tmp_path):
    # Another process with another string-hash seed: nothing may depend on hash() or set order.
    code = ("import sys; from olmoe_jax.data import corpus; corpus.corpus_builder(sys.argv[1])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env,
                   capture_output=True, cwd=pathlib.Path(__file__).parents[2])
    for split in ("train", "validation"):
        assert corpus.read_split(str(tmp_path), split) == corpus.read_split(builtin_cfg.data.data_dir, split)


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


def test_a_stdlib_file_never_feeds_both_splits(documents):
    splits_of_group = collections.defaultdict(set)
    for doc in documents:
        splits_of_group[doc.group].add(corpus.split_of(doc.group))
    assert all(len(s) == 1 for s in splits_of_group.values())
    # and the split really is by group: a file's code chunks and docstrings share one
    groups = collections.defaultdict(set)
    for doc in documents:
        groups[doc.group].add(doc.domain)
    assert sum(1 for g in groups.values() if g == {"code", "prose"}) > 100


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
