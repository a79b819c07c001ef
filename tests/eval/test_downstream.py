"""Downstream evaluation: metrics from scores, built-in tasks, task files, and the
lm-evaluation-harness adapter scoring exactly as our evaluator on the same items."""
import json

import numpy as np
import pytest

from olmoe_jax.data.errors import DataError
from olmoe_jax.eval import downstream, tasks
from olmoe_jax.eval.loglik import Scorer
from olmoe_jax.eval.tasks import Item, Task


def test_acc_and_acc_norm_from_scores():
    task = Task("t", "choice", (Item("q", ("a", "bbbb"), 1), Item("q", ("cc", "d"), 0)))
    # item 1: raw picks "a" (-2 > -3), per char picks "bbbb" (-0.75 > -2): acc 0, acc_norm 1
    # item 2: raw picks "cc" (-1 > -1.5), per char "cc" (-0.5 > -1.5): both right
    scores = [[(-2.0, False), (-3.0, False)], [(-1.0, True), (-1.5, False)]]
    m = downstream.metrics(task, "cloze", scores)
    assert (m["acc"], m["acc_norm"], m["chance"], m["n"]) == (0.5, 1.0, 0.5, 2)
    assert m["acc_stderr"] == pytest.approx(np.std([0, 1], ddof=1) / np.sqrt(2))
    assert m["acc_norm_stderr"] == 0.0


def test_mc_form_scores_letters_after_lettered_choices():
    task = Task("t", "choice", (Item("2 + 2 =", ("4", "5"), 0),))
    (reqs,) = downstream.requests(task, "mc")
    assert reqs == [("2 + 2 =\nA. 4\nB. 5\nAnswer:", " A"), ("2 + 2 =\nA. 4\nB. 5\nAnswer:", " B")]


@pytest.mark.parametrize("name", list(tasks.BUILTIN))
def test_builtin_tasks_are_fixed_and_well_formed(name):
    a, b = tasks.builtin_task(name, 50), tasks.builtin_task(name, 50)
    assert a == b and len(a.items) == 50
    for it in a.items:
        if a.kind == "choice":
            assert len(set(it.choices)) == len(it.choices) == 4
        gold = it.choices[it.gold]
        if name.startswith("arith_add_small"):
            x, y = it.query.rstrip(" =").split(" + ")
            assert int(gold) == int(x) + int(y)
        elif name == "arith_mixed":
            assert int(gold) == eval(it.query.rstrip(" =").replace("/", "//"))  # noqa: S307 (digits and an operator)
        elif name == "records_email":
            first, last = it.query.split("\n")[0][len("name: "):].split(" ")
            assert gold == f"{first.lower()}.{last.lower()}@example.com"
        elif name == "records_total":
            qty, price = it.query.rstrip(",").split(",")[-2:]
            assert gold == f"{int(qty) * round(float(price) * 100) / 100:.2f}"
    assert a.chance in (None, 0.25)


def test_builtin_tasks_are_the_same_in_every_process():
    """Items must not depend on Python's per-process string hashing (set order)."""
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    code = ("from olmoe_jax.eval import tasks; "
            "print(repr([tasks.builtin_task(n, 30).items for n in tasks.BUILTIN]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1


def test_task_file_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"query": "x", "choices": ["a", "b"], "gold": 0}) + "\n"
                 + json.dumps({"query": "y", "choices": ["a"], "gold": 0}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*choices"):
        tasks.load_jsonl_task(str(p))
    with pytest.raises(DataError, match="not a built-in task"):
        tasks.resolve_tasks(["nope"])


def _items(tmp_path):
    rng = np.random.default_rng(0)
    words = ["a", "I", "ox", "cat", "elephantine", "photosynthesis", "zz", "underground"]  # lengths 1..14
    choice = [{"query": f"item {i}: the", "choices": list(rng.choice(words, 4, replace=False)), "gold": int(i % 4)}
              for i in range(24)]
    completion = [{"query": f"count {i}", "continuation": str(rng.choice(words))} for i in range(10)]
    paths = []
    for name, rows in (("local_choice", choice), ("local_completion", completion)):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(p) for p in paths]


def test_harness_adapter_accuracy_equals_our_evaluator(char_model, tmp_path):
    harness = pytest.importorskip("olmoe_jax.eval.harness", reason="lm-eval is the [eval] extra")
    cfg, params, tok = char_model
    paths = _items(tmp_path)
    ours = downstream.evaluate_tasks(Scorer(params, cfg), tok, [tasks.load_jsonl_task(p) for p in paths], ["cloze"])
    folder = tmp_path / "yaml"
    folder.mkdir()
    names = [harness.task_yaml(tasks.load_jsonl_task(p), p, str(folder)) for p in paths]
    theirs = harness.run_harness(harness.OlmoeLM(params, cfg, tok), names, str(folder),
                                 hf_home=str(tmp_path / "hf"))
    c, t = ours["local_choice"]["cloze"], theirs["local_choice"]
    assert 0 < c["acc"] < 1 and c["acc"] != c["acc_norm"]  # a test that can tell the two apart
    assert (t["acc"], t["acc_norm"]) == (c["acc"], c["acc_norm"])
    assert t["acc"] == ours["local_choice"]["cloze"]["acc"]
    assert theirs["local_completion"]["acc"] == ours["local_completion"]["completion"]["acc"]


def test_harness_generate_until_is_greedy_generation_cut_at_the_stop_string(char_model):
    harness = pytest.importorskip("olmoe_jax.eval.harness", reason="lm-eval is the [eval] extra")
    from types import SimpleNamespace  # pylint: disable=import-outside-toplevel

    from olmoe_jax.eval.generate import generate  # pylint: disable=import-outside-toplevel
    cfg, params, tok = char_model
    lm = harness.OlmoeLM(params, cfg, tok)
    prompts = ["The cat", "x = 1"]
    full = [tok.decode(ids) for ids in generate(params, cfg, [tok.encode(p) for p in prompts], max_new_tokens=12,
                                                 eos_id=tok.eos_id).tokens]
    stop = full[0][3:5]  # a string the first continuation contains
    reqs = [SimpleNamespace(args=(p, {"until": [stop], "max_gen_toks": 12})) for p in prompts]
    out = lm.generate_until(reqs)
    assert out == [f[:f.find(stop)] if stop in f else f for f in full]
    assert len(out[0]) < len(full[0])
