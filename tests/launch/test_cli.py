"""The `olmoe` CLI: bad input is one clear error line, exit code 2, and nothing written."""
import pytest

from launch.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--experiment", "nope"], "unknown experiment 'nope'"),
    (["train", "--experiment", "tiny_moe", "--set", "model.nope=1"], "unknown config key model.nope"),
    (["train", "--experiment", "tiny_moe", "--set", "model.num_experts=lots"], "expected int"),
    (["train", "--experiment", "tiny_moe", "--set", "model.top_k=17"], "model.top_k=17 exceeds"),
    (["train", "--experiment", "tiny_moe", "--set", "data.source=npy", "--set", "data.tokenizer=none",
      "--set", "data.eos_id=0", "--set", "data.path=/nonexistent/*.npy"], "/nonexistent"),
    (["train", "--experiment", "tiny_moe", "--set", "data.source=jsonl",
      "--set", "data.path=/nonexistent/x.jsonl"], "/nonexistent"),
])
def test_bad_train_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, argv, message):
    workdir = tmp_path / "run"
    code, out, err = _run(capsys, *argv, "--workdir", str(workdir))
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], err
    assert not workdir.exists()


def test_unknown_command(capsys):
    code, _, err = _run(capsys, "fly")
    assert code == 2 and "unknown command 'fly'" in err


def test_experiments_listing_and_params(capsys):
    code, out, _ = _run(capsys, "experiments")
    assert code == 0
    entries = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}  # under family headers
    assert entries >= {"olmoe_1b7b", "dense_1b", "tiny_moe", "tiny_dense", "granularity/e32k4-tiny"}
    assert "granularity: " in out
    code, out, _ = _run(capsys, "experiments", "--params", "olmoe_1b7b")
    assert code == 0 and "total 6,919,161,856" in out and "active per token 1,282,017,280" in out
    code, out, _ = _run(capsys, "experiments", "--config", "tiny_moe", "--set", "model.num_experts=32")
    assert code == 0 and "num_experts: 32" in out


def test_corrupt_npy_data_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "part-0.npy"
    bad.write_bytes(b"\x01\x02\x03")  # 3 bytes: not a whole number of uint16 tokens
    workdir = tmp_path / "run"
    code, _, err = _run(capsys, "train", "--experiment", "tiny_moe", "--workdir", str(workdir),
                        "--set", "data.source=npy", "--set", "data.tokenizer=none", "--set", "data.eos_id=0",
                        "--set", f"data.path={bad}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "part-0.npy" in err, err
    assert not workdir.exists()
