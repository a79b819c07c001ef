"""The commands end to end: import-hf -> generate -> export-hf -> import-hf, and upcycle, through
`olmoe` itself, against transformers; bad input is one error line and nothing written."""

import jax
import numpy as np
import pytest
from hf_reference import build_hf, hf_logits, rel_err, write_tiny_tokenizer

from launch.cli import main
from olmoe_jax.model import transformer
from olmoe_jax.train.checkpoint import load_config, load_params

transformers = pytest.importorskip("transformers")
DENSE_REF = ["--set", "model.moe_impl=dense"]


def _olmoe(capsys, *argv):
    capsys.readouterr()  # drop what building the reference models printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _logits(workdir, tokens):
    cfg, params = load_config(workdir), load_params(workdir)
    return np.asarray(jax.jit(lambda p, t: transformer.apply(p, t, cfg)[0])(params, tokens))


def test_import_generate_export_roundtrip(tmp_path, capsys, tokens):
    hf = tmp_path / "hf"
    model = build_hf("k2_gqa_nonorm", hf)
    write_tiny_tokenizer(hf)
    w, out, w2 = tmp_path / "w", tmp_path / "out", tmp_path / "w2"

    code, stdout, err = _olmoe(capsys, "import-hf", "--hf", hf, "--workdir", w, *DENSE_REF)
    assert code == 0, err
    assert "tokenizer.json copied" in stdout and (w / "tokenizer" / "tokenizer.json").exists()
    assert rel_err(_logits(w, tokens), hf_logits(model, tokens)) <= 1e-5

    code, stdout, err = _olmoe(
        capsys,
        "generate",
        "--workdir",
        w,
        "--prompt",
        "the cat",
        "--prompt",
        "hello world, hello",
        "--max-new-tokens",
        6,
    )
    assert code == 0, err
    assert "--- 'the cat'" in stdout and "tokens/s" in err

    code, stdout, err = _olmoe(capsys, "export-hf", "--workdir", w, "--out", out)
    assert code == 0, err
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(model, tokens))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(hf / "tokenizer.json"))
    for text in ("the cat sat", "hello moe experts"):
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text).ids

    assert _olmoe(capsys, "import-hf", "--hf", out, "--workdir", w2, *DENSE_REF)[0] == 0
    for a, b in zip(jax.tree.leaves(load_params(w)), jax.tree.leaves(load_params(w2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_upcycle_hf_olmo_and_our_dense(tmp_path, capsys, tokens):
    hf = tmp_path / "olmo"
    dense = build_hf("olmo", hf)
    ref = hf_logits(dense, tokens)
    up = tmp_path / "up"
    code, stdout, err = _olmoe(
        capsys,
        "upcycle",
        "--hf",
        hf,
        "--workdir",
        up,
        "--num-experts",
        4,
        "--top-k",
        2,
        "--norm-topk-prob",
        *DENSE_REF,
    )
    assert code == 0, err
    cfg = load_config(up)
    assert (cfg.model.ffn_type, cfg.model.num_experts, cfg.model.expert_dim) == ("moe", 4, 44)
    assert rel_err(_logits(up, tokens), ref) <= 1e-5  # the MoE starts as the dense OLMo

    w, up2 = tmp_path / "w", tmp_path / "up2"
    assert _olmoe(capsys, "import-hf", "--hf", hf, "--workdir", w, *DENSE_REF)[0] == 0
    code, _, err = _olmoe(
        capsys,
        "upcycle",
        "--from",
        w,
        "--workdir",
        up2,
        "--num-experts",
        3,
        "--top-k",
        1,
        "--noise",
        0.5,
    )
    assert code == 0, err
    moe = load_params(up2)["layers"]["moe"]["w_down"]
    assert moe.shape == (2, 3, 44, 36) and not np.array_equal(moe[:, 0], moe[:, 1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["import-hf", "--hf", "{tmp}/missing"], "no such folder"),
        (
            ["import-hf", "--hf", "{tmp}/hf", "--set", "model.nope=1"],
            "unknown config key model.nope",
        ),
        (["upcycle", "--hf", "{tmp}/hf", "--num-experts", "4"], "needs a dense model"),
        (["upcycle", "--hf", "{tmp}/hf", "--noise", "2"], "--noise 2.0 must be"),
        (["upcycle", "--hf", "{tmp}/hf", "--step", "3"], "--step applies to a --from"),
        (["upcycle", "--hf", "{tmp}/hf", "--set", "model.d_model=64"], "--set model.d_model: upcycling"),
        (["export-hf", "--out", "{tmp}/o"], "does not exist"),
        (["generate", "--prompt", "x"], "does not exist"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, argv, message):
    build_hf("k1_mha_norm_tied", tmp_path / "hf")
    workdir = tmp_path / "w"
    code, _, err = _olmoe(capsys, *[a.format(tmp=tmp_path) for a in argv], "--workdir", workdir)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not workdir.exists() and not (tmp_path / "o").exists()


def test_refuses_existing_workdir_and_nonempty_out(tmp_path, capsys):
    build_hf("k1_mha_norm_tied", tmp_path / "hf")
    w = tmp_path / "w"
    assert _olmoe(capsys, "import-hf", "--hf", tmp_path / "hf", "--workdir", w, *DENSE_REF)[0] == 0
    code, _, err = _olmoe(capsys, "import-hf", "--hf", tmp_path / "hf", "--workdir", w)
    assert code == 2 and "already holds a run" in err
    code, _, err = _olmoe(capsys, "export-hf", "--workdir", w, "--out", tmp_path / "hf")
    assert code == 2 and "not empty" in err


def test_import_refuses_a_tokenizer_larger_than_the_model_before_writing(tmp_path, capsys):
    hf = tmp_path / "hf"
    build_hf("k1_mha_norm_tied", hf)  # vocab_size 97
    tok = write_tiny_tokenizer(hf, vocab_size=400)  # as many pieces as the texts give
    assert tok.get_vocab_size() > 97
    w = tmp_path / "w"
    code, _, err = _olmoe(capsys, "import-hf", "--hf", hf, "--workdir", w, *DENSE_REF)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"the tokenizer has {tok.get_vocab_size()} ids but model.vocab_size=97" in lines[0]
    assert not w.exists()
