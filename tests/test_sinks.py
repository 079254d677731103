"""The monitor's record sinks (sigma_core.sinks): one interface, write(records) and close().

Checked: a custom sink receives exactly the records ``monitor.last`` holds, once per recorded
forward; the JSON-lines file is ``json.dumps`` of each record, one line each, whether it comes
from ``path=`` or a ``JsonlSink`` in ``sinks=``; a sink that raises never fails the forward (a
warning, once, and the other sinks still receive the records); under a real two-process
``torch.distributed`` group (gloo) only rank 0 writes the shared file and the custom sink, while
in-memory and per-rank sinks receive every rank's records.
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from sigma_core.monitor import EntropyMonitor
from sigma_core.sinks import JsonlSink, MemorySink, RecordSink, SinkSet, is_writer


def _layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0), torch.randn(3, 5, 8)


class Collect(RecordSink):
    def __init__(self):
        self.writes = []
        self.closed = 0

    def write(self, records):
        self.writes.append(records)

    def close(self):
        self.closed += 1


class Broken(RecordSink):
    def __init__(self):
        self.calls = 0

    def write(self, records):
        self.calls += 1
        raise OSError("disk full")

    def close(self):
        raise OSError("cannot close")


def test_a_custom_sink_receives_exactly_the_records_last_holds():
    layer, x = _layer()
    sink = Collect()
    with EntropyMonitor(layer, every=2, sinks=[sink]) as mon:
        seen = []
        for step in range(5):
            layer(x)
            if step % 2 == 0:
                assert len(sink.writes) == step // 2 + 1
                assert sink.writes[-1] is mon.last and len(mon.last) == 2  # 1 layer x 2 heads
                seen.append([dict(r) for r in mon.last])
            else:  # a forward that does not record writes nothing
                assert len(sink.writes) == (step + 1) // 2
        assert mon.sinks[-1] is sink and isinstance(mon.sinks[0], MemorySink)
    assert [[r["step"] for r in w] for w in sink.writes] == [[0, 0], [2, 2], [4, 4]]
    assert sink.writes == seen  # nothing modified them afterwards
    assert sink.closed == 1  # closed with the monitor, once
    mon.close()
    assert sink.closed == 1


def test_memory_sink_keeps_the_history_asked_for():
    layer, x = _layer()
    every, keep = MemorySink(), MemorySink(keep=2)
    with EntropyMonitor(layer, sinks=[every, keep]) as mon:
        for _ in range(3):
            layer(x)
    assert [w[0]["step"] for w in every.history] == [0, 1, 2]
    assert [w[0]["step"] for w in keep.history] == [1, 2]
    assert every.last is keep.last is mon.last


def test_jsonl_is_one_json_dumps_line_per_record_from_path_or_a_sink(tmp_path):
    layer, x = _layer()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"earlier": 1}\n')  # appended to, never truncated
    history = MemorySink()
    with EntropyMonitor(layer, every=2, path=a, bound_every=2, sinks=[JsonlSink(b), history]):
        for _ in range(5):
            layer(x)
    expected = "".join(json.dumps(r) + "\n" for recs in history.history for r in recs)
    assert len(history.history) == 3
    assert a.read_text(encoding="utf-8") == '{"earlier": 1}\n' + expected
    assert b.read_bytes() == expected.encode()
    rows = [json.loads(line) for line in expected.splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2, 4, 4]
    assert [r["bound_rows"] > 0 for r in rows] == [True, True, False, False, True, True]


def test_a_failing_sink_never_fails_the_forward_it_warns_once():
    layer, x = _layer()
    with torch.no_grad():
        ref = layer(x)
    broken, after = Broken(), Collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = EntropyMonitor(layer, sinks=[broken, after])
        outs = [layer(x) for _ in range(3)]
        mon.close()
    for out in outs:
        assert torch.equal(out.detach(), ref)
    assert broken.calls == 3 and len(after.writes) == 3  # the sinks after it still receive the records
    assert after.writes[-1] is mon.last and len(mon.last) == 2
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("Broken failed to write: OSError: disk full" in m for m in msgs) == 1
    assert sum("Broken failed to close: OSError: cannot close" in m for m in msgs) == 1
    assert after.closed == 1


@pytest.mark.parametrize("sinks,match", [
    (Collect(), "sinks must be a list"),  # one sink, not a list of them
    ([object()], "sinks must hold objects with write"),
    ("out.jsonl", "sinks must be a list"),
    (3, "sinks must be a list"),
])
def test_bad_sinks_are_refused_by_name(sinks, match):
    layer, _ = _layer()
    with pytest.raises(TypeError, match=match):
        EntropyMonitor(layer, sinks=sinks)
    assert not layer._forward_pre_hooks and not layer._forward_hooks  # nothing left attached


def test_bad_sink_arguments_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"path must contain '\{rank\}'"):
        JsonlSink(tmp_path / "x.jsonl", per_rank=True)
    with pytest.raises(TypeError, match="path"):
        JsonlSink(3)
    with pytest.raises(TypeError, match="per_rank"):
        JsonlSink(tmp_path / "x.jsonl", per_rank=1)
    with pytest.raises(ValueError, match="keep"):
        MemorySink(keep=-1)
    with pytest.raises(TypeError, match="sinks must hold"):
        SinkSet([print])


def test_without_a_process_group_every_process_writes(tmp_path):
    assert is_writer()
    sink = JsonlSink(str(tmp_path / "r{rank}.jsonl"), per_rank=True)
    assert sink.path == str(tmp_path / "r0.jsonl") and sink.all_ranks
    sink.close()


WORKER = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from torch import nn
    from sigma_core.monitor import EntropyMonitor
    from sigma_core.sinks import JsonlSink, MemorySink, RecordSink

    rank, root = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)

    class Collect(RecordSink):
        def __init__(self):
            self.writes = []
        def write(self, records):
            self.writes.append(records)

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
    torch.manual_seed(1 + rank)  # each rank its own data: the records tell the ranks apart
    x = torch.randn(3, 5, 8)
    custom, memory = Collect(), MemorySink()
    with EntropyMonitor(layer, path=f"{root}/shared.jsonl",
                        sinks=[custom, memory, JsonlSink(root + "/rank{rank}.jsonl", per_rank=True)]) as mon:
        for _ in range(2):
            layer(x)
    json.dump({"custom": custom.writes, "memory": list(memory.history), "last": mon.last},
              open(f"{root}/seen{rank}.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
""")


def test_one_writer_rank_under_torch_distributed(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    for s in seen:  # the in-memory sinks hold each rank's own records
        assert len(s["memory"]) == 2 and s["memory"][-1] == s["last"] and len(s["last"]) == 2
    assert seen[0]["last"] != seen[1]["last"]  # different data on the two ranks
    assert len(seen[0]["custom"]) == 2 and seen[0]["custom"] == seen[0]["memory"]
    assert seen[1]["custom"] == []  # rank 1 is not the writer
    lines = lambda path: [json.loads(line) for line in path.read_text().splitlines()]
    rank0 = [r for recs in seen[0]["memory"] for r in recs]
    assert lines(tmp_path / "shared.jsonl") == rank0  # one writer: rank 0, once
    for r in (0, 1):  # per-rank files: every rank writes its own
        assert lines(tmp_path / f"rank{r}.jsonl") == [x for recs in seen[r]["memory"] for x in recs]


def test_the_custom_sink_example_of_docs_monitor_prints_what_the_page_says(capsys):
    import re
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "monitor.md").read_text(encoding="utf-8")
    section = page.split("\n## Sinks\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    shown = re.search(r"```text\n(.*?)```", section, flags=re.S).group(1)
    exec(compile(code, "docs/monitor.md", "exec"), {})
    assert capsys.readouterr().out == shown
