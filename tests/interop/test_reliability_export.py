"""export-hf of a model imported from an HF folder without tokenizer files: the weights and
configs are written, no tokenizer files, one line says so, and no tokenizer is trained."""
import os

import numpy as np
import pytest
from hf_reference import build_hf, hf_logits

from launch.cli import main

transformers = pytest.importorskip("transformers")


def test_export_without_a_tokenizer_round_trips(tmp_path, capsys, tokens):
    hf, w, out = tmp_path / "hf", tmp_path / "w", tmp_path / "out"
    model = build_hf("k2_gqa_nonorm", hf)  # config + safetensors only
    assert main(["import-hf", "--hf", str(hf), "--workdir", str(w), "--set", "model.moe_impl=dense"]) == 0
    capsys.readouterr()
    cache = os.environ["OLMOE_JAX_CACHE"]
    before = sorted(os.listdir(cache)) if os.path.isdir(cache) else []

    code = main(["export-hf", "--workdir", str(w), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    notes = [line for line in stdout.splitlines() if line.startswith("no tokenizer files written")]
    assert len(notes) == 1 and "not trained by an export" in notes[0]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert (sorted(os.listdir(cache)) if os.path.isdir(cache) else []) == before  # nothing trained
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(model, tokens))
    assert back.generation_config.eos_token_id == model.config.eos_token_id
