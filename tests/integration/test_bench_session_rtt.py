import json

from tsukimi.bench import session_rtt


def test_session_rtt_measures_both_settings_and_the_lane_between_two_processes(capsys):
    assert session_rtt.main(["--rounds", "1", "--num", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["median"]) == {"grpc_defaults", "tsukimi"}
    for medians in result["median"].values():
        assert medians["empty_us"] > 0 and medians["get_32_misses_us"] > 0
        assert medians["lane_empty_us"] > 0 and medians["lane_get_32_misses_us"] > 0
        assert medians["asyncio_echo_us"] > 0
    assert result["grpc_experiments"] in (None, "-event_engine_client,-event_engine_listener")
