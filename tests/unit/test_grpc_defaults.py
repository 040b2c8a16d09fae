from tsukimi.kvpool import grpc_defaults


def test_experiments_are_named_only_for_the_measured_grpcio_minor_version():
    assert grpc_defaults.experiments_for("1.85.3") == "-event_engine_client,-event_engine_listener"
    assert grpc_defaults.experiments_for("1.85.1") == grpc_defaults.EXPERIMENTS
    assert grpc_defaults.experiments_for("1.86.0") is None
    assert grpc_defaults.experiments_for("2.85.0") is None


def test_apply_leaves_a_value_the_user_set_and_fills_an_unset_one(monkeypatch):
    monkeypatch.setattr(grpc_defaults.metadata, "version", lambda name: "1.85.3")
    env = {"GRPC_EXPERIMENTS": ""}
    grpc_defaults.apply(env)
    assert env == {"GRPC_EXPERIMENTS": ""}
    env = {}
    grpc_defaults.apply(env)
    assert env == {"GRPC_EXPERIMENTS": grpc_defaults.EXPERIMENTS}
    monkeypatch.setattr(grpc_defaults.metadata, "version", lambda name: "1.99.0")
    env = {}
    grpc_defaults.apply(env)
    assert env == {}
