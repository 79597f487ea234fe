"""bench.py runs end to end in --quick mode (tiny model, a few seconds) and prints its four
sections. It checks that the benchmark works, not how fast anything is: speed is measured by
`python bench.py` and recorded in BENCHMARKS.md."""

import torch

import bench
import protocol as P
from model import GPT, GPTConfig, save_checkpoint


def test_quick_bench_prints_all_four_sections(capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for header in ("## 1. Throughput", "## 2. Bookkeeping", "## 3. Async vs sequential",
                   "## 4. KV cache memory"):
        assert header in out, header
    assert "MiB" in out and "x |" in out  # the tables hold figures and ratios


def test_real_episodes_section_runs_on_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    tok = P.Tokenizer.numbers()
    save_checkpoint(str(path), GPT(GPTConfig.preset("tiny", tok.n_vocab)), tokenizer=tok.spec())
    assert bench.main(["--quick", "--ckpt", str(path), "--real-episodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "## 5. Real episodes" in out and "keys read / keys needed" in out
    assert bench.main(["--quick", "--ckpt", str(tmp_path / "missing.pt")]) == 2


def test_keys_read_counts_the_riders_and_the_padding_of_a_run():
    # one decode forward of slots 0 and 2 at lengths 3 and 9 (slot 1 not in it): read as one run
    # of slots 0..2, each of the 3 slots reads 10 keys (9 + the new one), 30, though the rows need
    # 4 + 10 = 14; split in two runs (no cost per run) they read just what they need; a prefill
    # (2 new tokens) is not a decode, not counted
    decode = (torch.tensor([0, 2]), torch.tensor([3, 9]), torch.zeros(2, 1), torch.tensor([1, 1]))
    prefill = (torch.tensor([2]), torch.tensor([0]), torch.zeros(1, 2), torch.tensor([2]))
    assert bench.keys_read([decode, prefill], run_cost=1000) == (30, 14)
    assert bench.keys_read([decode, prefill], run_cost=0) == (14, 14)


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
