"""`make gpu-check`'s writer: the GPU section of BENCHMARKS.md is replaced between its markers
(the rest of the file untouched), appended where absent; without a GPU the command refuses in
one line with a non-zero exit."""

import pytest
import torch

from speedlm.bench import gpu_check


def test_the_gpu_section_is_replaced_between_its_markers(tmp_path):
    f = tmp_path / "BENCHMARKS.md"
    f.write_text(f"# Benchmarks\n\nbefore\n\n## GPU\n\n{gpu_check.START}\nold numbers\n{gpu_check.END}\n\nafter\n")
    text = gpu_check.section("12 passed, 3 skipped", "# speedlm speed benchmark\n\n## Results\n\n| a |\n", "301 s",
                             "make gpu-check", "an H100")
    gpu_check.write_section(f, text)
    out = f.read_text()
    assert out.startswith("# Benchmarks\n\nbefore\n\n## GPU\n\n") and out.endswith("\n\nafter\n")
    assert "old numbers" not in out and "12 passed, 3 skipped" in out and "an H100" in out
    assert "### speedlm speed benchmark" in out and "#### Results" in out  # nested under the section
    gpu_check.write_section(f, text)  # idempotent
    assert f.read_text() == out


def test_the_section_is_appended_where_the_file_has_no_markers(tmp_path):
    f = tmp_path / "BENCHMARKS.md"
    f.write_text("# Benchmarks\n")
    gpu_check.write_section(f, gpu_check.section("1 passed", None, "failed (exit 1)", "make gpu-check", "a GPU"))
    assert "## GPU (make gpu-check)" in f.read_text() and "failed (exit 1)" in f.read_text()


def test_without_a_gpu_it_refuses_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal is for machines without one")
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]
