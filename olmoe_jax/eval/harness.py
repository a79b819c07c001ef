"""lm-evaluation-harness (`lm_eval` 0.4.13) adapter: every harness task on any checkpoint here.

`OlmoeLM(params, cfg, tokenizer)` implements the harness's `LM` interface with this package's
scorer (loglik.Scorer: batched, no KV cache) and generator (generate.py: KV cache, greedy):
loglikelihood, loglikelihood_rolling, generate_until. It is registered as model "olmoe-jax".
`run_harness` evaluates tasks offline: a folder of task YAMLs (`task_yaml` writes one for a
local JSONL task file) with the harness's own task registry switched off, no network and the
datasets cache in a scratch HF_HOME.

This is the only module that imports lm_eval (about 760 MB installed: `pip install
'olmoe-jax[eval]'`); nothing imports it unless the harness is asked for.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval 0.4.13: "
                      "pip install 'lm-eval==0.4.13' (or the package's [eval] extra)") from e

from olmoe_jax.data.errors import DataError
from olmoe_jax.eval.generate import generate
from olmoe_jax.eval.loglik import Scorer, encode_pair
from olmoe_jax.eval.tasks import Task


@register_model("olmoe-jax")
class OlmoeLM(LM):
    """A checkpoint of this package as an lm-eval model.

    params / cfg: as `checkpoint.load_params` / `load_config` give them; tokenizer: the
    workdir's (`data.make_tokenizer(cfg)`). EOS is the prefix of an empty context and of
    rolling windows (the models here have no BOS).
    """

    def __init__(self, params, cfg, tokenizer, *, tokens_per_batch: int = 8192, max_gen_toks: int = 64):
        super().__init__()
        self.scorer = Scorer(params, cfg, tokens_per_batch=tokens_per_batch)
        self.params, self.cfg, self.tok = params, cfg, tokenizer
        self.max_gen_toks = max_gen_toks

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, ctx, cont, self.tok.eos_id) for ctx, cont in (r.args for r in requests)]
        return [(s.logprob, s.is_greedy) for s in self.scorer.loglikelihood(pairs)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [r.args[0] for r in requests]
        return self.scorer.loglikelihood_rolling(self.tok.encode_batch(texts), self.tok.eos_id)

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut before the first stop string (`until`) or at EOS."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((tuple(until), n), []).append(i)
        room = self.cfg.model.max_seq_len
        for (until, n), idx in groups.items():
            n = min(n, room - 1)
            prompts = [self.tok.encode(requests[i].args[0])[-(room - n):] or [self.tok.eos_id] for i in idx]
            gen = generate(self.params, self.cfg, prompts, max_new_tokens=n, eos_id=self.tok.eos_id,
                           pad_id=self.tok.pad_id)
            for i, ids in zip(idx, gen.tokens):
                ids = ids[:-1] if ids and ids[-1] == self.tok.eos_id else ids
                text = self.tok.decode(ids)
                cut = min([text.find(s) for s in until if s and s in text], default=len(text))
                out[i] = text[:cut]
        return out  # type: ignore[return-value]


def task_yaml(task: Task, jsonl_path: str, folder: str) -> str:
    """Writes `<folder>/<task.name>.yaml`, the harness form of a task file (tasks.py format):
    multiple choice with acc and acc_norm (cloze form), or a loglikelihood task with acc
    (is_greedy) for completion items. Returns the task name."""
    common = [
        f"task: {task.name}",
        "dataset_path: json",
        f"dataset_kwargs:\n  data_files:\n    test: {os.path.abspath(jsonl_path)}",
        "test_split: test",
        "doc_to_text: query",
        f"target_delimiter: {task.delimiter!r}".replace("'", '"'),
    ]
    if task.kind == "choice":
        body = ["output_type: multiple_choice", "doc_to_choice: choices", "doc_to_target: gold",
                "metric_list:\n  - metric: acc\n  - metric: acc_norm"]
    else:
        body = ["output_type: loglikelihood", "doc_to_target: continuation",
                "metric_list:\n  - metric: acc\n  - metric: perplexity"]
    Path(folder, f"{task.name}.yaml").write_text("\n".join(common + body) + "\n")
    return task.name


@contextlib.contextmanager
def _offline(hf_home: str | None):
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME")
    old = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="olmoe_hf_home_") as scratch:
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=hf_home or scratch)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run_harness(lm: OlmoeLM, tasks: Sequence[str], include_path: str | list[str], *, limit: int | None = None,
                include_defaults: bool = False, hf_home: str | None = None) -> dict[str, Any]:
    """{task: {metric: value}} from `lm_eval.simple_evaluate` on the task YAMLs in include_path.

    include_defaults: also search the harness's bundled tasks (their datasets must already be
    in the datasets cache: nothing is downloaded). No bootstrap: stderr is the closed form.
    """
    with _offline(hf_home):
        # HF_HOME is read when the datasets library is imported: import it after setting it.
        from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
        manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise DataError(f"--harness {', '.join(unknown)}: no such harness task in {include_path}"
                             + ("" if include_defaults else " (bundled tasks: add --harness-defaults)"))
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=False)
    return {name: {k.split(",")[0]: v for k, v in m.items() if k != "alias"}
            for name, m in res["results"].items()}
