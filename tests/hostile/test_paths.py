"""No command writes into a directory holding files it did not create."""

from host.testing import base_config


def test_merge_lora_refuses_a_foreign_directory(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(base_config(tiny_model("qwen3_moe"), text_file, out, max_steps=2))
    assert run_host("train", cfg).exit_code == 0

    foreign = tmp_path / "my_model"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"mine": true}')
    result = run_host("merge-lora", cfg, "--out", foreign)
    assert result.exit_code == 2 and "not empty and was not written by host merge-lora" in result.output
    assert (foreign / "config.json").read_text() == '{"mine": true}' and len(list(foreign.iterdir())) == 1

    a_file = tmp_path / "merged.bin"
    a_file.write_text("x")
    result = run_host("merge-lora", cfg, "--out", a_file)
    assert result.exit_code == 2 and "is an existing file" in result.output and a_file.read_text() == "x"

    fresh = tmp_path / "merged"
    assert run_host("merge-lora", cfg, "--out", fresh).exit_code == 0
    assert (fresh / "config.json").exists() and (fresh / "host_merged").exists()
    again = run_host("merge-lora", cfg, "--out", fresh)  # its own earlier output may be replaced
    assert again.exit_code == 0, again.output
