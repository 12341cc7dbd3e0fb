"""simulations.benchmark_deploy reads its timings out of Flower's logs: check its parsers on
lines captured from a real deployed run (Flower 1.42, 3 SuperNodes on loopback, time-stamped
by the benchmark). A change in Flower's log wording breaks these tests instead of silently
turning the benchmark's figures into nan. No process is started; nothing is timed."""

from __future__ import annotations

import math

import pytest

from simulations.benchmark_deploy import (
    exchanges_per_round,
    message_gaps,
    parse_echo,
    parse_node_messages,
    parse_run_timeline,
    round_seconds,
    run_phases,
    span_stats,
)

C, R = "\x1b[92m", "\x1b[0m"  # Flower colours its level names

# SuperLink log: the end of one search run, then a whole one (HTTP access lines left out)
LINK = "\n".join(f"{t} {C}INFO {R}:      {msg}" for t, msg in [
    ("1795784496.340", "All logs for run ID `4026411421858562809` returned"),
    ("1795784503.421", "ControlServicer.StartRun"),
    ("1795784503.463", "Created run 12675025383324872928 in federation @none/default"),
    ("1795784503.475", "ControlServicer.StreamLogs"),
    ("1795784505.911", "Started task 10101751786240141597 of run 12675025383324872928"),
    ("1795784508.752", "[Fleet.GetRun] Requesting `Run` for run_id=12675025383324872928"),
    ("1795784508.775", "[Fleet.GetFab] Requesting FAB for fab_hash=15500baec77d4fc11212f2c62192225ef34e6afb86789496256544196e3ccb71"),
    ("1795784508.929", "[Fleet.GetRun] Requesting `Run` for run_id=12675025383324872928"),
    ("1795784509.537", "[Fleet.GetRun] Requesting `Run` for run_id=12675025383324872928"),
    ("1795784519.602", "[Fleet.PushMessages] Push replies from node_id=17767481403943775489"),
    ("1795784521.887", "[Fleet.PushMessages] Push replies from node_id=4362086794208970484"),
    ("1795784522.260", "[Fleet.PushMessages] Push replies from node_id=13651575184676856506"),
    ("1795784525.084", "Finished task 10101751786240141597 of run 12675025383324872928"),
    ("1795784525.535", "All logs for run ID `12675025383324872928` returned"),
]) + "\n"

# one SuperNode's log over two runs; the ClientApp's first line lands in the SuperNode's output
NODE = "\n".join(f"{t} {C}INFO {R}:      {msg}" for t, msg in [
    ("1795784479.909", "[RUN 4026411421858562809]"),
    ("1795784479.909", "Receiving: query message (ID: 80024a3acfe38b78d1f15bf09be824ed467dd17f17b4cc2eb0296f3dbc24acaa)"),
    ("1795784480.004", "Received successfully"),
    ("1795784484.071", "Start `flwr-clientapp` process"),
    ("1795784493.593", "[RUN 4026411421858562809]"),
    ("1795784493.594", "Sending: query message (ID: 49f4e733fc41458e62cd29915c949566c2a9fcdbd044fb4d9404b3cde075261a)"),
    ("1795784493.796", "Sent successfully"),
    ("1795784508.897", "[RUN 12675025383324872928]"),
    ("1795784508.897", "Receiving: query.secagg message (ID: 26efb18fd78755f38185d08704c22823820d7cd847d28c0814a2adc22028664c)"),
    ("1795784509.336", "Received successfully"),
    ("1795784514.572", "Start `flwr-clientapp` process"),
    ("1795784521.871", "Sending: query.secagg message (ID: d83d88dcf039f753346e343cf43a3933015ceda1e6ec601d1a21df709a19c33a)"),
    ("1795784522.105", "Sent successfully"),
]) + "\n"


def test_run_timeline_and_phases_from_the_superlink_log():
    tl = parse_run_timeline(LINK, "12675025383324872928")
    # the first of the three SuperNodes' GetRun, the last of their replies; the other run's lines ignored
    assert tl == {"start_run": 1795784503.463, "task_started": 1795784505.911, "node_get_run": 1795784508.752,
                  "task_finished": 1795784525.084, "logs_returned": 1795784525.535, "last_reply": 1795784522.260}
    phases = run_phases(tl, t_cli_start=1795784498.5, t_cli_end=1795784526.0)
    assert list(phases) == ["cli_submit", "link_launch", "to_first_node", "nodes", "server_after_reply", "cli_stream_end"]
    assert phases["nodes"] == pytest.approx(1795784522.260 - 1795784508.752, abs=1e-3)
    assert sum(phases.values()) == pytest.approx(1795784526.0 - 1795784498.5, abs=1e-2)  # the phases tile the run
    assert parse_run_timeline(LINK, "999") == {}


def test_node_messages_split_at_the_clientapp_start():
    spans = parse_node_messages(NODE)
    assert [s[0] for s in spans] == ["query", "query.secagg"]
    assert spans[1] == (("query.secagg", 1795784508.897, 1795784514.572, 1795784522.105))
    assert parse_node_messages(NODE, since=1795784500.0) == spans[1:]  # one run's window
    assert message_gaps(spans) == [pytest.approx(1795784508.897 - 1795784493.796, abs=1e-3)]
    stats = span_stats(spans)
    assert stats["count"] == 2 and stats["hold_s"] == pytest.approx(((493.796 - 479.909) + (522.105 - 508.897)) / 2, abs=1e-3)
    # a SuperNode whose ClientApp printed nothing: the split is unknown, the hold still counted
    no_app = "".join(line + "\n" for line in NODE.splitlines() if "flwr-clientapp" not in line)
    assert all(math.isnan(s[2]) for s in parse_node_messages(no_app)) and len(parse_node_messages(no_app)) == 2


def test_rounds_exchanges_and_echo_output():
    summary = {"rounds": [{"round": 0, "elapsed_s": 0.0}, {"round": 1, "elapsed_s": 40.5}, {"round": 2, "elapsed_s": 120.0}]}
    assert round_seconds(summary) == [40.5, 79.5]
    # one node's messages in a 2-round secure run: round 2 also holds the private evaluation
    types = ["train", *["query.secagg"] * 3, "train", *["query.secagg"] * 3, "evaluate", *["query.secagg"] * 3, "train.deploy"]
    assert exchanges_per_round([(t, 0.0, math.nan, 0.0) for t in types]) == [4, 8]
    assert exchanges_per_round([(t, 0.0, math.nan, 0.0) for t in ["evaluate", "train", "train.deploy"]]) == [1]
    assert parse_echo('1795784349.115 ECHO_RESULT {"flower": [6.207, 9.179], "app_poll": [8.192, 8.2]}\n') == {
        "flower": [6.207, 9.179], "app_poll": [8.192, 8.2]}
    with pytest.raises(ValueError):
        parse_echo("no result here\n")
