"""Other worker groups on the predictions topic, read back from the real broker."""

from __future__ import annotations

import time

import pytest

from streamproc.wire import codec as wire

pytestmark = pytest.mark.broker


def test_other_groups_on_the_predictions_topic_are_named(topics) -> None:
    """Recent predictions of another group are reported with what differs; this group's
    own, and another group's older than the recent span, are not."""
    from streamproc import kafka
    from streamproc.inference.groups import RECENT_OTHER_GROUP_S, other_groups
    from streamproc.inference.predictions import prediction_headers

    settings = topics
    now = time.time_ns()
    model = {"name": "m", "version": "2"}

    def rec(app: str, emitted_ns: int, hop_ms: int) -> wire.KafkaRecord:
        p = wire.Prediction("cam", 0, 10**9, "x", {"x": 1.0}, {}, model, emitted_ns)
        r = wire.encode_prediction(p)
        return wire.KafkaRecord(r.key, r.value, (*r.headers, *prediction_headers(
            settings.replace(app_id=app, hop_ms=hop_ms), model)), r.timestamp_ms)

    old = now - int((RECENT_OTHER_GROUP_S + 60) * 1e9)
    producer = kafka.producer(settings)
    for r in (rec(settings.app_id, now, 500), rec("other", now, 1000), rec("other", now, 1000),
              rec("gone", old, 250)):
        producer.send(settings.topic("predictions"), key=r.key, value=r.value,
                      headers=list(r.headers))
    producer.flush(30)
    producer.close()
    assert other_groups(settings.replace(app_id="fresh"), model) != []  # all but "gone"
    (line,) = other_groups(settings, model)
    assert "2 prediction(s) from worker group 'other'" in line
    assert "hop_ms=1000" in line and "hop_ms=500" in line and "'m/2'" not in line
    assert other_groups(settings.replace(app_id="other", hop_ms=1000), model) == [
        line.replace("'other'", repr(settings.app_id)).replace("2 prediction", "1 prediction")
        .replace("hop_ms=1000", "@").replace("hop_ms=500", "hop_ms=1000").replace("@", "hop_ms=500")]
