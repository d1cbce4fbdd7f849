import pytest

from orchestrator.services.tracking import flatten


def test_flatten_params_with_slashes():
    assert flatten({"model": {"subspace_dims": [8, 16], "levels": 2}, "name": "x", "eval": {"w": None}}) == {
        "model/subspace_dims": "[8, 16]",
        "model/levels": "2",
        "name": "x",
        "eval/w": "None",
    }


def _rest_error(code: str, message: str):
    from mlflow.exceptions import RestException

    return RestException({"error_code": code, "message": message})


def test_a_busy_servers_400_is_retried_and_a_real_bad_request_is_not(monkeypatch):
    """Under 64 trials MLflow-on-SQLite answered 400 'QueuePool limit ... reached' (issue 28): nothing was wrong
    with the request, so it is retried until it goes through; a 400 about the request itself fails at once."""
    from orchestrator.services import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    busy = _rest_error(
        "BAD_REQUEST", "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"
    )
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise busy
        return "run-id"

    assert tracking._with_retry(flaky, "create run", deadline_s=60) == "run-id"
    assert len(calls) == 3
    assert not tracking._permanent(
        _rest_error("BAD_REQUEST", "(sqlite3.OperationalError) database is locked")
    )

    bad = _rest_error("INVALID_PARAMETER_VALUE", "Metric value must be a number")
    calls.clear()

    def wrong():
        calls.append(1)
        raise bad

    with pytest.raises(type(bad)):
        tracking._with_retry(wrong, "log batch", deadline_s=60)
    assert len(calls) == 1
    assert tracking._permanent(_rest_error("BAD_REQUEST", "Invalid experiment id"))
