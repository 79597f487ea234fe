"""bench.py runs end to end in --quick mode (tiny model, a few seconds) and prints its four
sections. It checks that the benchmark works, not how fast anything is: speed is measured by
`python asyncthink.py bench` and recorded in BENCHMARKS.md."""

import bench


def test_quick_bench_prints_all_four_sections(capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for header in ("## 1. Throughput", "## 2. Bookkeeping", "## 3. Async vs sequential",
                   "## 4. KV cache memory"):
        assert header in out, header
    assert "MiB" in out and "x |" in out  # the tables hold figures and ratios


def test_training_speed_benchmark_runs(capsys):
    import bench_train
    assert bench_train.main(["--preset", "tiny", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "bare nanoGPT-style loop" in out and "MFU" in out and "train.py step" in out
    assert "padded batches" in out


def test_training_speed_benchmark_refuses_a_missing_gpu_with_one_line(capsys, monkeypatch):
    import pytest
    import torch
    import bench_train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--preset", "tiny", "--steps", "2", "--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
