"""MetricsWriter: what lands in TensorBoard, the JSONL file and on the console."""

import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_multilora.metrics import MetricsWriter


def read_scalars(directory):
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_and_validation_metrics_everywhere(tmp_path, capsys):
    writer = MetricsWriter(tmp_path / "tb", tmp_path / "logs" / "metrics.jsonl", train_iters=10)
    writer.log_train(
        1,
        {"a": {"lm loss": torch.tensor(2.5), "learning-rate": 1e-3, "tokens": 40, "skipped": False},
         "b": {"lm loss": 3.25, "grad-norm": 0.5}},
        {"iteration-time": 0.25, "throughput": 100.0, "batch-size": 6},
        consumed_samples={"a": 4, "b": 2},
    )
    writer.log_train(2, {"a": {"lm loss": 2.0}}, {"iteration-time": 0.5}, consumed_samples=12)
    writer.log_validation(2, {"a": 1.75, "b": 3.0})
    writer.close()

    scalars = read_scalars(tmp_path / "tb")
    assert scalars["a/lm loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["b/lm loss"] == [(1, 3.25)]
    assert scalars["a/tokens"] == [(1, 40.0)] and scalars["a/skipped"] == [(1, 0.0)]
    assert scalars["b/grad-norm"] == [(1, 0.5)]
    assert scalars["iteration-time"] == [(1, 0.25), (2, 0.5)]
    assert scalars["batch-size"] == [(1, 6.0)]
    # "vs samples" twins: each tenant's own count; global tags the total (or the single number given)
    assert scalars["a/lm loss vs samples"] == [(4, 2.5), (12, 2.0)]
    assert scalars["b/lm loss vs samples"] == [(2, 3.25)]
    assert scalars["iteration-time vs samples"] == [(6, 0.25), (12, 0.5)]
    assert scalars["a/lm loss validation"] == [(2, 1.75)] and scalars["b/lm loss validation"] == [(2, 3.0)]

    rows = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert rows[0] == {"iteration": 1, "tenant": "a", "lm loss": 2.5, "learning-rate": 1e-3, "tokens": 40,
                       "skipped": 0, "iteration-time": 0.25, "throughput": 100.0, "batch-size": 6,
                       "consumed_samples": 4}
    assert rows[1]["tenant"] == "b" and rows[1]["grad-norm"] == 0.5 and rows[1]["consumed_samples"] == 2
    assert rows[2] == {"iteration": 2, "tenant": "a", "lm loss": 2.0, "iteration-time": 0.5,
                       "consumed_samples": 12}
    assert rows[3:] == [{"iteration": 2, "tenant": "a", "lm loss validation": 1.75},
                        {"iteration": 2, "tenant": "b", "lm loss validation": 3.0}]

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "iteration 1/10 (10.0%)" in lines[0]
    assert "a lm loss 2.5" in lines[0] and "b lm loss 3.25" in lines[0]
    assert "iteration 2/10 (20.0%, ETA " in lines[1]
    assert "validation" in lines[2] and "a 1.75" in lines[2] and "b 3" in lines[2]


def test_non_finite_values_stay_valid_json(tmp_path):
    writer = MetricsWriter(metrics_file=tmp_path / "m.jsonl", console=False)
    writer.log_train(3, {"a": {"lm loss": float("nan"), "grad-norm": float("inf"), "skipped": True}}, {})
    writer.close()
    line = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"iteration": 3, "tenant": "a", "lm loss": None, "grad-norm": None,
                                "skipped": 1}


def test_iteration_without_tenants_keeps_global_metrics(tmp_path):
    writer = MetricsWriter(metrics_file=tmp_path / "m.jsonl", console=False)
    writer.log_train(4, {}, {"iteration-time": 0.1})
    writer.close()
    assert read_jsonl(tmp_path / "m.jsonl") == [{"iteration": 4, "iteration-time": 0.1}]


def test_resumed_run_appends(tmp_path):
    for iteration in (1, 2):
        writer = MetricsWriter(metrics_file=tmp_path / "m.jsonl", console=False)
        writer.log_validation(iteration, {"a": 1.0})
        writer.close()
    assert [row["iteration"] for row in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path, capsys):
    writer = MetricsWriter(tmp_path / "tb", tmp_path / "m.jsonl", enabled=False)
    writer.log_train(1, {"a": {"lm loss": 1.0}}, {"iteration-time": 0.1})
    writer.log_validation(1, {"a": 1.0})
    writer.close()
    assert not (tmp_path / "tb").exists() and not (tmp_path / "m.jsonl").exists()
    assert capsys.readouterr().out == ""


def test_console_without_train_iters_has_no_eta(capsys):
    writer = MetricsWriter()
    writer.log_train(5, {"a": {"lm loss": 1.0}}, {})
    writer.log_train(6, {"a": {"tokens": 3}}, {})
    out = capsys.readouterr().out.splitlines()
    assert "iteration 5 | a lm loss 1" in out[0] and "ETA" not in out[1]
    assert "a lm loss -" in out[1]  # a tenant without a loss this iteration
